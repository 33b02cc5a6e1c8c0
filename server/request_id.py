"""Request ids: one per HTTP request, taken from `X-Request-Id` when sane, echoed back, bound to logs."""

from __future__ import annotations

import re
import uuid

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "castellan.request_id"
_SANE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def request_id_of(scope: Scope) -> str:
    value = scope.get(SCOPE_KEY)
    return value if isinstance(value, str) else ""


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _SANE.match(given) else uuid.uuid4().hex
        scope[SCOPE_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)
