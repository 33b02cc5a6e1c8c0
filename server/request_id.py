"""Request ids: one per HTTP request, taken from `X-Request-Id` when sane, echoed back, bound to logs."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, reset_contextvars

SCOPE_KEY = "castellan.request_id"
HEADER = b"x-request-id"
_SANE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def request_id_of(scope: Scope) -> str:
    value = scope.get(SCOPE_KEY)
    return value if isinstance(value, str) else ""


def assign_request_id(scope: Scope) -> str:
    """The request's id (its first `X-Request-Id` when sane, else a fresh one), kept in the scope."""
    given = ""
    for key, value in scope["headers"]:
        if key == HEADER:
            given = value.decode("latin-1")
            break
    request_id = given if _SANE.match(given) else new_request_id()
    scope[SCOPE_KEY] = request_id
    return request_id


def new_request_id() -> str:
    """A random (version 4) UUID in hex, as `uuid.uuid4().hex` makes it, without building the UUID object."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


def stamp_request_id(message: Message, request_id: str) -> None:
    """Set `x-request-id` on a response start message (replacing any the app set; the rest unchanged)."""
    headers = message["headers"] = list(message["headers"])
    value = request_id.encode("latin-1")
    found = [i for i, (key, _) in enumerate(headers) if key == HEADER]
    for i in reversed(found[1:]):
        del headers[i]
    if found:
        headers[found[0]] = (HEADER, value)
    else:
        headers.append((HEADER, value))


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = assign_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                stamp_request_id(message, request_id)
            await send(message)

        tokens = bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            reset_contextvars(**tokens)
