"""The console's HTTP edge: security headers on every answer (a strict Content-Security-Policy, no
framing, no referrer, no caching) and, on every state-changing request, an Origin check and a CSRF
form token bound to the session. A refusal is a 403 page, never a half-done change."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.transport import matches

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # same-origin, not no-referrer: under no-referrer a browser sends `Origin: null` on its own form posts
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


class SecurityHeaders:
    """Adds the security headers to every response of the wrapped app (pages, fragments, static files)."""

    def __init__(self, app: ASGIApp, *, secure: bool) -> None:
        self.app = app
        self._secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/console/static/") or "/static/" in scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if self._secure:
                    headers.setdefault("strict-transport-security", "max-age=31536000")
                headers.setdefault("cache-control", "public, max-age=3600" if static else "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def same_origin(headers: Headers, scheme: str, trusted: Iterable[str]) -> bool:
    """The request comes from a page of this console: its Origin (or, when a browser sends none, its
    Referer) is the origin the request was addressed to, or one configured as the gateway's own.
    A request that names no origin at all is refused: every browser this console supports sends one."""
    claimed = headers.get("origin")
    if claimed is None or claimed == "null":
        referer = headers.get("referer")
        claimed = _origin(referer) if referer else None
    if not claimed:
        return False
    host = headers.get("host", "")
    allowed = {f"{scheme}://{host}".lower(), *(o.lower().rstrip("/") for o in trusted)}
    return claimed.lower().rstrip("/") in allowed


MAX_FORM_BYTES = 65_536


class HostGuard:
    """Refuses (421) a request whose Host is not the gateway's (the allow-list of /mcp): a page that
    rebinds its own name to this address gets nothing from the console."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self._hosts = tuple(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not matches(Headers(scope=scope).get("host", ""), self._hosts):
            await _refuse(send, "refused: this address is not one this gateway serves (Host check)", status=421)
            return
        await self.app(scope, receive, send)


class CsrfGuard:
    """Refuses (403) a state-changing request unless it comes from this console's own origin and
    carries the CSRF token of the session it acts in (form field `csrf`, or header `X-CSRF-Token`).

    The token is bound to the session (`binding(scope)`: the sealed session's id, or before sign-in
    the pre-session cookie), so a token taken from one session is worth nothing in another."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        binding: Callable[[Headers], str | None],
        valid: Callable[[str | None, str | None], bool],
        trusted_origins: Iterable[str],
    ) -> None:
        self.app = app
        self._binding = binding
        self._valid = valid
        self._trusted = tuple(trusted_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not same_origin(headers, scope.get("scheme", "http"), self._trusted):
            await _refuse(send, "refused: this request did not come from a page of this console (origin check)")
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_FORM_BYTES:
                await _refuse(send, "refused: the form is too large", status=413)
                return
        token = headers.get("x-csrf-token")
        if token is None and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get("csrf")
            token = values[0] if values else None
        if not self._valid(self._binding(headers), token):
            await _refuse(send, "refused: the form's CSRF token is missing or is not this session's (reload the page)")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _refuse(send: Send, text: str, status: int = 403) -> None:
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Refused</title>"
        f"<main><h1>Refused</h1><p>{html.escape(text)}</p><p><a href=/console/>Back to the console</a></p></main>"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
