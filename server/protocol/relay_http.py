"""The HTTP side of relaying: a 2026-07-28 `tools/call` that asked for progress or log messages is
answered with an SSE response (they ride the response stream) even when the gateway answers with
JSON by default; every other request goes to the SDK's session manager as it is.

(2025-era sessions get what is relayed on the call's SSE stream when the gateway serves SSE, or on
the session's GET stream in JSON mode: see `server.relay.channel.SessionChannel`.)
"""

from __future__ import annotations

from typing import Any

from mcp.server._streamable_http_modern import handle_modern_request
from mcp.server.streamable_http import check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from server.relay.needed import LOG_LEVEL_META_KEY, progress_token
from server.request_body import Body, buffered, tool_call_params

_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower().encode("ascii")


def streams_notifications(body: Body) -> bool:
    """The request is a `tools/call` whose `_meta` asks for progress or log messages."""
    params = tool_call_params(body)
    meta = params.get("_meta") if params is not None else None
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
        body, replay = await buffered(scope, receive)
        if not streams_notifications(body):
            await sessions.handle_request(scope, replay, send)
            return
        state: Any = getattr(sessions, "_lifespan_state", None)
        await handle_modern_request(sessions.app, sessions.security_settings, False, state, scope, replay, send)
