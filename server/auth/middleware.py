"""The authentication edge of /mcp: no valid bearer token, no MCP (HTTP 401 with RFC 9728 metadata)."""

from __future__ import annotations

import structlog
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth.presented import PresentedTokens
from server.auth.scopes import ToolScopes
from server.auth.verifier import TokenVerifier
from server.errors import Unauthenticated
from server.http_errors import send_error
from server.identity import Identity
from server.metrics import Metrics
from server.request_body import Body, buffered, tool_call_params

log = structlog.get_logger("castellan.auth")

IDENTITY_SCOPE_KEY = "castellan.identity"
_MAX_PRINCIPALS = 10_000


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when it is missing or not Bearer."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def identity_of(scope: Scope) -> Identity | None:
    """The identity the edge authenticated for this request, if any."""
    identity = scope.get(IDENTITY_SCOPE_KEY)
    return identity if isinstance(identity, Identity) else None


class BearerAuthMiddleware:
    """Verifies `Authorization: Bearer` before the MCP transport sees the request.

    On success the `Identity` is put in the ASGI scope (`identity_of`) and, for the SDK's session
    binding, as `scope["user"]`, so a session can only be used with the credential that opened it.
    The token itself goes no further than this: it is never passed upstream.
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        resource_metadata_url: str,
        metrics: Metrics,
        hint: str = "",
        scopes: ToolScopes | None = None,
        presented: PresentedTokens | None = None,
    ) -> None:
        """`hint` is added to every 401's message: how to get a token (dev mode names the command).
        `scopes`: a `tools/call` whose token lacks the tool's scopes gets 403 `insufficient_scope`.
        `presented`: where the caller's token is kept for token exchange (only when an upstream uses it)."""
        self.app = app
        self._hint = hint
        self._scopes = scopes
        self._presented = presented
        self._verifier = verifier
        self._metadata_url = resource_metadata_url
        self._metrics = metrics
        self._principals: dict[int, tuple[Identity, AuthCredentials, AuthenticatedUser]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = _authorization(scope)
        if header is None:
            await self._reject(scope, receive, send, None, "missing_token", "bearer token required")
            return
        token = bearer_token(header)
        if token is None:
            await self._reject(scope, receive, send, "invalid_request", "bad_scheme", "use Authorization: Bearer")
            return
        try:
            identity = await self._verifier.verify(token)
        except Unauthenticated as exc:
            await self._reject(scope, receive, send, exc.error, "invalid_token", exc.description)
            return
        if self._scopes is not None and self._scopes.per_tool and scope.get("method") == "POST":
            body, receive = await buffered(scope, receive)
            tool = _called_tool(body)
            missing = self._scopes.missing(tool, identity.scopes) if tool is not None else ()
            if tool is not None and missing:
                await self._insufficient_scope(scope, receive, send, tool, missing)
                return
        if self._presented is not None:
            self._presented.remember(identity, token)
        scope[IDENTITY_SCOPE_KEY] = identity
        scope["auth"], scope["user"] = self._principal(identity)
        await self.app(scope, receive, send)

    def _principal(self, identity: Identity) -> tuple[AuthCredentials, AuthenticatedUser]:
        """Starlette's credentials and the SDK's user for `identity`, made once per verified identity.

        The verifier's cache hands back the same `Identity` object for every call with the same token,
        so the two objects (a pydantic model among them: ~3.5 µs a request) are kept beside it, keyed by
        the object's id while the entry holds the object itself (so the id cannot be reused). Nothing
        reads them but to check the caller (the SDK's session binding compares `client_id`)."""
        entry = self._principals.get(id(identity))
        if entry is not None and entry[0] is identity:
            return entry[1], entry[2]
        credentials = AuthCredentials(list(identity.scopes))
        user = AuthenticatedUser(
            AccessToken(
                token="[verified]",
                client_id=identity.agent_id,
                scopes=list(identity.scopes),
                expires_at=identity.expires_at,
                subject=identity.subject,
                claims={"iss": identity.issuer},
            )
        )
        if len(self._principals) >= _MAX_PRINCIPALS:
            self._principals.clear()  # identities the verifier no longer caches would otherwise pile up
        self._principals[id(identity)] = (identity, credentials, user)
        return credentials, user

    async def _insufficient_scope(
        self, scope: Scope, receive: Receive, send: Send, tool: str, missing: tuple[str, ...]
    ) -> None:
        """HTTP 403 with the scopes the call needs (RFC 6750 §3.1; the MCP authorization spec's step-up)."""
        assert self._scopes is not None
        self._metrics.auth_failures.labels("insufficient_scope").inc()
        needed = " ".join(self._scopes.needed(tool))
        description = f"tool {tool} needs scope {' '.join(missing)}"
        log.info("request_insufficient_scope", tool=tool, missing=list(missing))
        challenge = (
            f'Bearer error="insufficient_scope", scope="{needed}", '
            f'resource_metadata="{self._metadata_url}", error_description="{description.replace(chr(34), chr(39))}"'
        )
        await send_error(scope, receive, send, 403, f"forbidden: {description}", {"WWW-Authenticate": challenge})

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, error: str | None, metric: str, description: str
    ) -> None:
        self._metrics.auth_failures.labels(metric).inc()
        log.info("request_unauthenticated", reason=description, path=scope.get("path"))
        challenge = f'Bearer resource_metadata="{self._metadata_url}"'
        if error is not None:
            safe = description.replace('"', "'")
            challenge += f', error="{error}", error_description="{safe}"'
        message = f"unauthorized: {description}" + (f"; {self._hint}" if self._hint else "")
        await send_error(scope, receive, send, 401, message, {"WWW-Authenticate": challenge})


def _authorization(scope: Scope) -> str | None:
    """The request's first Authorization header (as Starlette's `Headers.get` reads it)."""
    for key, value in scope["headers"]:
        if key == b"authorization":
            return str(value.decode("latin-1"))
    return None


def _called_tool(body: Body) -> str | None:
    """The tool a `tools/call` request names; None for anything else (the transport judges what it is)."""
    params = tool_call_params(body)
    name = params.get("name") if params is not None else None
    return name if isinstance(name, str) else None
