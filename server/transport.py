"""Transport security for /mcp: Host and Origin validation (DNS rebinding) and a request size limit."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http_errors import send_error
from server.request_body import read_bounded

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
    before authentication or parsing. Runs first, so a rebinding page learns nothing from a 401.

    The body is read here, once (`read_bounded`: the app behind gets it replayed, and finds it in the
    scope), and refused as the SDK's `RequestBodyLimitMiddleware` refuses it."""

    def __init__(self, app: ASGIApp, *, hosts: Sequence[str], origins: Sequence[str], max_body_bytes: int) -> None:
        self.app = app
        self._hosts = tuple(hosts)
        self._origins = tuple(origins)
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host: bytes | None = None
        origin: bytes | None = None
        for key, value in scope["headers"]:  # the first of each, as Starlette's Headers.get reads them
            if key == b"host":
                if host is None:
                    host = value
            elif key == b"origin" and origin is None:
                origin = value
        host_name = host.decode("latin-1") if host is not None else ""
        if not _matches(host_name, self._hosts):
            await send_error(scope, receive, send, 421, f"Host {host_name!r} is not allowed for this gateway")
            return
        if origin is not None and not _matches(origin_name := origin.decode("latin-1"), self._origins):
            await send_error(scope, receive, send, 403, f"Origin {origin_name!r} is not allowed")
            return
        read = await read_bounded(scope, receive, self._max_body_bytes)
        if read is None:
            await Response("Request body too large", status_code=413)(scope, receive, send)
            return
        await self.app(scope, read[1], send)
