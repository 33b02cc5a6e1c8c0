"""Sign in with a bearer token (verified by the gateway's own verifier), sign out."""

from __future__ import annotations

import secrets
import time

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.console.context import console_of, redirect
from server.console.roles import AUDIT_SCOPE, may_enter, roles_from_scopes
from server.console.session import COOKIE, PRE_COOKIE
from server.errors import Unauthenticated

log = structlog.get_logger("castellan.console")
_COOKIE_PATH = "/console"
_MAX_COOKIE = 4_000  # browsers keep cookies up to 4096 bytes


async def sign_in_page(request: Request) -> Response:
    console = console_of(request)
    if await console.user(request) is not None:
        return redirect("/console/audit", request)
    return _sign_in(request, None)


def _sign_in(request: Request, error: str | None, status: int = 200) -> Response:
    console = console_of(request)
    pre = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(16)
    response = console.render(request, "sign_in.html", None, status=status, binding=pre, error=error)
    response.set_cookie(
        PRE_COOKIE, pre, path=_COOKIE_PATH, httponly=True, secure=console.secure_cookies, samesite="strict",
        max_age=3600,
    )  # fmt: skip
    return response


async def sign_in(request: Request) -> Response:
    console = console_of(request)
    form = await request.form()
    token = str(form.get("token") or "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        return _sign_in(request, "Paste a bearer token.", 400)
    try:
        identity = await console.gateway.verifier.verify(token)
    except Unauthenticated as exc:
        log.info("console_sign_in_refused", why=exc.description)
        return _sign_in(request, f"The token was refused: {exc.description}", 401)
    if not may_enter(roles_from_scopes(identity.scopes)):
        log.info("console_sign_in_refused", agent_id=identity.agent_id, why="no castellan:audit scope")
        return _sign_in(request, f"This token does not hold the {AUDIT_SCOPE} scope, which the console needs.", 403)
    cookie, _ = console.sealer.seal(token)
    if len(cookie) > _MAX_COOKIE:
        return _sign_in(request, "This token is too large to keep in a browser session.", 400)
    log.info("console_signed_in", agent_id=identity.agent_id, subject=identity.subject, scopes=list(identity.scopes))
    response = redirect("/console/audit", request)
    max_age = int(console.sealer.max_age)
    if identity.expires_at:
        max_age = max(1, min(max_age, int(identity.expires_at - time.time())))
    response.set_cookie(
        COOKIE, cookie, path=_COOKIE_PATH, httponly=True, secure=console.secure_cookies, samesite="strict",
        max_age=max_age,
    )  # fmt: skip
    response.delete_cookie(PRE_COOKIE, path=_COOKIE_PATH)
    return response


async def sign_out(request: Request) -> Response:
    console = console_of(request)
    response = redirect("/console/sign-in", request)
    response.delete_cookie(COOKIE, path=_COOKIE_PATH, httponly=True, secure=console.secure_cookies, samesite="strict")
    return response


ROUTES = [
    Route("/sign-in", sign_in_page, methods=["GET"]),
    Route("/sign-in", sign_in, methods=["POST"]),
    Route("/sign-out", sign_out, methods=["POST"]),
]
