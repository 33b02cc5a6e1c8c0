"""The HTTP side of relaying: a 2026-07-28 `tools/call` that asked for progress or log messages is
answered with an SSE response (they ride the response stream) even when the gateway answers with
JSON by default; every other request goes to the SDK's session manager as it is.

(2025-era sessions get what is relayed on the call's SSE stream when the gateway serves SSE, or on
the session's GET stream in JSON mode: see `server.relay.channel.SessionChannel`.)
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server._streamable_http_modern import handle_modern_request
from mcp.server.streamable_http import check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from server.relay.needed import LOG_LEVEL_META_KEY, progress_token

_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower().encode("ascii")


def streams_notifications(body: bytes) -> bool:
    """The request is a `tools/call` whose `_meta` asks for progress or log messages."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: the SDK refuses it
        return False
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return False
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and (progress_token(meta) is not None or meta.get(LOG_LEVEL_META_KEY) is not None)


class RelayingSessions:
    """`handle_request` for /mcp, in front of the SDK's `StreamableHTTPSessionManager`."""

    def __init__(self, sessions: StreamableHTTPSessionManager) -> None:
        self._sessions = sessions

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        sessions = self._sessions
        version = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == _HEADER), None)
        if (
            not sessions.json_response
            or scope.get("method") != "POST"
            or version is None
            or version in HANDSHAKE_PROTOCOL_VERSIONS
            or not check_accept_headers(Request(scope))[1]
        ):
            await sessions.handle_request(scope, receive, send)
            return
        body, replay = await _buffered(receive)
        if not streams_notifications(body):
            await sessions.handle_request(scope, replay, send)
            return
        state: Any = getattr(sessions, "_lifespan_state", None)
        await handle_modern_request(sessions.app, sessions.security_settings, False, state, scope, replay, send)


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
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
