"""What every console page needs: the console's parts, the signed-in user, and rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from server.audit.redaction import Redactor
from server.console.chain_status import ChainChecker
from server.console.index import ConsoleIndex
from server.console.oauth import ConsoleOAuth
from server.console.roles import Role, may_enter, roles_from_scopes
from server.console.session import COOKIE, PRE_COOKIE, SessionSealer
from server.errors import Unauthenticated
from server.identity import Identity

if TYPE_CHECKING:
    from server.gateway import Gateway

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """The signed-in person: who the token says they are, and what they may do here."""

    identity: Identity
    roles: frozenset[Role]
    sid: str

    @property
    def name(self) -> str:
        return self.identity.subject or self.identity.agent_id

    def can(self, role: Role) -> bool:
        return role in self.roles


class SignInRequired(Exception):
    """No session, an expired or refused token, or a token without `castellan:audit`."""


class NotPermitted(Exception):
    """Signed in, but the page or action needs a role the token does not hold."""

    def __init__(self, role: Role) -> None:
        super().__init__(role)
        self.role = role


@dataclass
class Console:
    gateway: Gateway
    sealer: SessionSealer
    index: ConsoleIndex | None
    """None when the audit backend is not the SQLite outbox (nothing to search)."""
    redactor: Redactor
    secure_cookies: bool
    trusted_origins: tuple[str, ...]
    mlflow_ui_url: str
    chain: ChainChecker | None = None
    env: Environment = field(init=False)
    mlflow_experiment_id: str | None = None
    oauth: ConsoleOAuth | None = None
    """"Sign in with <issuer>"; None when the gateway knows no authorization server."""

    def __post_init__(self) -> None:
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(["html"], default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )

    async def user(self, request: Request) -> ConsoleUser | None:
        """The signed-in user, or None: the sealed cookie opened and its token verified again now."""
        session = self.sealer.open(request.cookies.get(COOKIE))
        if session is None:
            return None
        try:
            identity = await self.gateway.verifier.verify(session.token)
        except Unauthenticated:
            return None
        roles = roles_from_scopes(identity.scopes)
        return ConsoleUser(identity, roles, session.sid) if may_enter(roles) else None

    async def require(self, request: Request, role: Role = Role.AUDIT) -> ConsoleUser:
        user = await self.user(request)
        if user is None:
            raise SignInRequired()
        if not user.can(role):
            raise NotPermitted(role)
        return user

    def render(
        self,
        request: Request,
        template: str,
        user: ConsoleUser | None,
        status: int = 200,
        *,
        binding: str | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """`binding`: what the page's CSRF token is bound to (default: the session, else the pre-session cookie)."""
        binding = binding or (user.sid if user else request.cookies.get(PRE_COOKIE, ""))
        body = self.env.get_template(template).render(
            request=request,
            user=user,
            Role=Role,
            csrf=self.sealer.csrf_token(binding) if binding else "",
            path=request.url.path,
            has_approvals=getattr(self.gateway, "approvals", None) is not None,
            **context,
        )
        return HTMLResponse(body, status_code=status)


def console_of(request: Request) -> Console:
    console = request.app.state.console
    assert isinstance(console, Console)
    return console


def redirect(url: str, request: Request) -> Response:
    """A redirect that htmx follows as a full page load too."""
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)
