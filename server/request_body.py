"""The body of a `/mcp` request, read ahead of the SDK by the edge: once, within the size limit, by the
transport guard (`read_bounded`), then looked inside by the middlewares that must (the step-up scope
check, the lean path, the relay's choice of a streaming response): parsed at most once, and handed on
intact (the SDK reads the same bytes, replayed)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Receive, Scope

SCOPE_KEY = "castellan.body"
UNREADABLE: Any = object()
"""`Body.message()` of a body that is not JSON (or nested past the parser's depth)."""
_UNPARSED: Any = object()


class Body:
    """The raw bytes of a request body and, parsed on first ask, the JSON message they hold."""

    __slots__ = ("_message", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._message: Any = _UNPARSED

    def message(self) -> Any:
        """The parsed JSON (any JSON value), or `UNREADABLE`; parsed once per request, whoever asks."""
        if self._message is _UNPARSED:
            try:
                self._message = json.loads(self.raw)
            except (ValueError, RecursionError):
                self._message = UNREADABLE
        return self._message


async def read_bounded(scope: Scope, receive: Receive, limit: int) -> tuple[Body, Receive] | None:
    """The whole body, read once and kept in the scope (as `buffered` keeps it), and a `receive` that
    replays it, as the SDK's `RequestBodyLimitMiddleware` replays: the bytes, then whatever ended them
    (a disconnect). None when the body is over `limit` bytes, by its Content-Length or by what arrived
    (then nothing after the chunk that crossed the limit is read)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                if int(value.decode("latin-1")) > limit:
                    return None
            except ValueError:
                pass
            break
    chunks: list[bytes] = []
    size = 0
    received = complete = False
    trailing: Message | None = None
    while True:
        message = await receive()
        if message["type"] != "http.request":
            trailing = message
            break
        received = True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            complete = True
            break
    body = Body(b"".join(chunks))
    scope[SCOPE_KEY] = body
    pending: list[Message] = []
    if received:
        pending.append({"type": "http.request", "body": body.raw, "more_body": not complete})
    if trailing is not None:
        pending.append(trailing)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return body, replay


async def buffered(scope: Scope, receive: Receive) -> tuple[Body, Receive]:
    """The whole body (the transport guard has bounded its size), and a `receive` that replays it.

    The body is kept in the ASGI scope: a later reader of the same request (handed the replaying
    `receive`) gets the same `Body`, and its parse, without reading or parsing again (on /mcp the
    transport guard has read it already, with `read_bounded`)."""
    held = scope.get(SCOPE_KEY)
    if isinstance(held, Body):
        return held, receive
    chunks: list[bytes] = []
    messages: list[Message] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            messages.append(message)  # a disconnect: replayed after the body, as it came
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = Body(b"".join(chunks))
    scope[SCOPE_KEY] = body
    pending: list[Message] = [{"type": "http.request", "body": body.raw, "more_body": False}, *messages]

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return body, replay


def tool_call_params(body: Body) -> dict[str, Any] | None:
    """The params of a `tools/call` request (an object); None for anything else, unreadable JSON and
    JSON nested past the parser's depth included (the transport judges what it is)."""
    message = body.message()
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    return params if isinstance(params, dict) else None
