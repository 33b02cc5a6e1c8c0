"""The body of a `/mcp` POST, read ahead of the SDK by the edge's middlewares that must look inside it
(the step-up scope check, the lean path, the relay's choice of a streaming response): read once,
parsed at most once, and handed on intact (the SDK reads the same bytes, replayed)."""

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


async def buffered(scope: Scope, receive: Receive) -> tuple[Body, Receive]:
    """The whole body (the transport guard has bounded its size), and a `receive` that replays it.

    The body is kept in the ASGI scope: a later reader of the same request (handed the replaying
    `receive`) gets the same `Body`, and its parse, without reading or parsing again."""
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
