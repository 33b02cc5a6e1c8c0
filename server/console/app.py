"""Builds the console: a Starlette app mounted by the gateway at `/console`, behind its guards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request, cookie_parser
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from server.audit.outbox import SqliteOutbox
from server.audit.redaction import Redactor
from server.console.chain_status import ChainChecker
from server.console.context import Console, NotPermitted, SignInRequired, console_of, redirect
from server.console.guard import CsrfGuard, HostGuard, SecurityHeaders
from server.console.index import ConsoleIndex
from server.console.oauth import ConsoleOAuth
from server.console.routes import approvals, audit, auth, catalog, charts
from server.console.session import COOKIE, PRE_COOKIE, SessionSealer
from server.transport import allowed_hosts

if TYPE_CHECKING:
    from server.gateway import Gateway

STATIC = Path(__file__).parent / "static"


def _mlflow_ui(gateway: Gateway) -> str:
    configured = gateway.settings.console.mlflow_ui_url or gateway.settings.audit.mlflow_tracking_uri
    return configured.rstrip("/") if urlsplit(configured).scheme in ("http", "https") else ""


def make_console(gateway: Gateway) -> Console:
    settings = gateway.settings
    key = settings.console.session_key
    max_age = settings.console.session_max_age_seconds
    sealer = (
        SessionSealer(key.get_secret_value().encode(), max_age)
        if key is not None
        else SessionSealer.from_file(settings.data_dir / "console-session.key", max_age)
    )
    outbox = gateway.outbox
    index = chain = None
    if isinstance(outbox, SqliteOutbox):
        index = ConsoleIndex(settings.data_file(settings.console.index_path, "console-index.db"), outbox.path)
        chain = ChainChecker(outbox)
    return Console(
        gateway=gateway,
        sealer=sealer,
        index=index,
        chain=chain,
        redactor=Redactor.from_settings(settings.audit),
        secure_cookies=settings.base_url.startswith("https://"),
        trusted_origins=(settings.base_url, *settings.server.allowed_origins),
        mlflow_ui_url=_mlflow_ui(gateway),
        oauth=ConsoleOAuth.from_settings(settings) if settings.console.oauth_sign_in else None,
    )


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    return redirect("/console/sign-in", request)


async def _not_permitted(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotPermitted)
    console = console_of(request)
    user = await console.user(request)
    return console.render(request, "forbidden.html", user, status=403, role=exc.role.value)


def build_console(console: Console) -> Starlette:
    """The ASGI app to mount at `/console`."""

    def binding(headers: Headers) -> str | None:
        cookies = cookie_parser(headers.get("cookie", ""))
        session = console.sealer.open(cookies.get(COOKIE))
        return session.sid if session else cookies.get(PRE_COOKIE)

    app = Starlette(
        routes=[
            *auth.ROUTES,
            *audit.ROUTES,
            *charts.ROUTES,
            *catalog.ROUTES,
            *approvals.ROUTES,
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[
            Middleware(SecurityHeaders, secure=console.secure_cookies),
            Middleware(
                CsrfGuard, binding=binding, valid=console.sealer.csrf_valid, trusted_origins=console.trusted_origins
            ),
        ],
        exception_handlers={SignInRequired: _sign_in_required, NotPermitted: _not_permitted},
    )
    app.state.console = console
    return app


def mount_console(app: Any, gateway: Gateway) -> None:
    """Serve the console at `/console` of the gateway's app (its state is `app.state.console`)."""
    console = make_console(gateway)
    app.state.console = console
    settings = gateway.settings
    guarded = HostGuard(build_console(console), allowed_hosts(settings.base_url, settings.server.allowed_hosts))
    app.mount("/console", guarded)


def close_console(app: Any) -> None:
    console = getattr(app.state, "console", None)
    if isinstance(console, Console) and console.index is not None:
        console.index.close()
