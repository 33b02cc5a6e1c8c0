"""Transport security for /mcp: Host and Origin validation (DNS rebinding) and a request size limit."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from mcp.server.transport_security import RequestBodyLimitMiddleware, TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http_errors import send_error

LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")


def allowed_hosts(public_url: str, configured: Sequence[str]) -> list[str]:
    """Loopback, the public URL's host, and whatever the operator configured."""
    netloc = urlsplit(public_url).netloc
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *([netloc] if netloc else []), *configured]))


def allowed_origins(public_url: str, configured: Sequence[str]) -> list[str]:
    parts = urlsplit(public_url)
    own = [f"{parts.scheme}://{parts.netloc}"] if parts.netloc else []
    loopback = [f"{scheme}://{h}" for scheme in ("http", "https") for h in LOOPBACK_HOSTS]
    return list(dict.fromkeys([*loopback, *own, *configured]))


def sdk_settings(hosts: Sequence[str], origins: Sequence[str]) -> TransportSecuritySettings:
    """The same allow-lists for the SDK's own check (defence in depth: it is off unless configured)."""
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=list(hosts), allowed_origins=list(origins)
    )


def _matches(value: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if value == pattern:
            return True
        if pattern.endswith(":*"):
            base = pattern[:-2]
            rest = value[len(base) + 1 :]
            if value.startswith(base + ":") and rest.isdigit():
                return True
            if value == base:  # no port given: the scheme's default port
                return True
    return False


def matches(value: str, patterns: Sequence[str]) -> bool:
    """`value` (a Host or Origin) is one of `patterns` (`name:*`: any port); the console checks Hosts with it."""
    return _matches(value, patterns)


class TransportGuard:
    """Rejects requests with a foreign Host (421) or Origin (403), or a body over `max_body_bytes` (413),
    before authentication or parsing. Runs first, so a rebinding page learns nothing from a 401."""

    def __init__(self, app: ASGIApp, *, hosts: Sequence[str], origins: Sequence[str], max_body_bytes: int) -> None:
        self.app = RequestBodyLimitMiddleware(app, max_body_bytes)
        self._hosts = tuple(hosts)
        self._origins = tuple(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not _matches(host, self._hosts):
            await send_error(scope, receive, send, 421, f"Host {host!r} is not allowed for this gateway")
            return
        origin = headers.get("origin")
        if origin is not None and not _matches(origin, self._origins):
            await send_error(scope, receive, send, 403, f"Origin {origin!r} is not allowed")
            return
        await self.app(scope, receive, send)
