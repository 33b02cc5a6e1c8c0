"""The one place that writes HTTP-level error responses (before MCP): JSON bodies, never tracebacks."""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.types import Receive, Scope, Send

# JSON-RPC "Invalid Request": the body of every /mcp rejection, so MCP clients can show the message.
_INVALID_REQUEST = -32600


async def send_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer with `status` and a JSON-RPC error body carrying `message`."""
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": _INVALID_REQUEST, "message": message}})
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body.encode()})
