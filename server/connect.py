"""`castellan connect URL`: a stdio MCP server that forwards every message to the gateway over
streamable HTTP with the agent's bearer token, for desktop agents that only speak stdio.

It bridges at the transport level (the `mcp` SDK's stdio server transport on one side, its
streamable HTTP client transport on the other), so both protocol eras, sessions and server-sent
events pass through; it adds the token, and for 2026-era requests the HTTP headers that era puts
beside the body (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`), read from the request itself.
"""

from __future__ import annotations

from typing import Any

import anyio
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp_types import PROTOCOL_VERSION_META_KEY


def with_http_headers(message: SessionMessage) -> SessionMessage:
    """A 2026-era request (its `_meta` names the protocol version) gets its per-request HTTP headers."""
    body: Any = message.message
    method = getattr(body, "method", None)
    params = getattr(body, "params", None) or {}
    version = (params.get("_meta") or {}).get(PROTOCOL_VERSION_META_KEY) if isinstance(params, dict) else None
    if not method or not isinstance(version, str):
        return message
    headers = {MCP_PROTOCOL_VERSION_HEADER: version, MCP_METHOD_HEADER: method}
    name_key = NAME_BEARING_METHODS.get(method)
    if name_key is not None and isinstance(name := params.get(name_key), str):
        headers[MCP_NAME_HEADER] = encode_header_value(name)
    return SessionMessage(body, metadata=ClientMessageMetadata(headers=headers))


async def bridge(url: str, token: str) -> None:
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        streamable_http_client(url, http_client=http) as (from_gateway, to_gateway, *_),
        stdio_server() as (from_client, to_client),
        anyio.create_task_group() as tasks,
    ):

        async def upstream() -> None:
            async for message in from_client:
                if not isinstance(message, Exception):  # an unparsable line: the SDK already answered it
                    await to_gateway.send(with_http_headers(message))
            tasks.cancel_scope.cancel()  # the desktop client went away: the session is over

        async def downstream() -> None:
            async for message in from_gateway:
                if not isinstance(message, Exception):
                    await to_client.send(message)
            tasks.cancel_scope.cancel()

        tasks.start_soon(upstream)
        tasks.start_soon(downstream)
