"""The body of a `/mcp` POST, read ahead of the SDK by the edge's middlewares that must look inside it
(the step-up scope check, the relay's choice of a streaming response), and handed on intact."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Receive


async def buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The whole body (the transport guard has bounded its size), and a `receive` that replays it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def tool_call_params(body: bytes) -> dict[str, Any] | None:
    """The params of a `tools/call` request (an object); None for anything else, unreadable JSON and
    JSON nested past the parser's depth included (the transport judges what it is)."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    return params if isinstance(params, dict) else None
