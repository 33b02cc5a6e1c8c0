"""A lean MCP client for `tools/call` on one streamable-HTTP upstream: one pooled aiohttp session.

The SDK `Client` costs about 1.2 ms of CPU per proxied call (its session, streams, pydantic models
and httpx); a pooled aiohttp POST about 0.2 ms. This client speaks only what a governed call with
nothing to relay needs, in the era the upstream's SDK connection negotiated:

- 2026-07-28: a self-contained POST with the request envelope in `_meta` and the routing headers
  (MCP-Protocol-Version, Mcp-Method, Mcp-Name, and Mcp-Param-* mirrored from the tool's input schema);
- 2025-era (handshake) versions: its own `initialize` session (Mcp-Session-Id), opened on first use
  and opened again once when the upstream has forgotten it (404: the call did not run).

It declares no client capabilities and sends no progress token, so an upstream cannot ask it for
sampling, elicitation or roots; a call that needs those goes through the SDK session (BOARD item 3).
Answers may be JSON or an SSE stream (notifications on it are dropped). Raises `MCPError` for a
JSON-RPC error answer, `UpstreamProtocolError` for an answer that is not MCP, and aiohttp's errors
for a broken connection: the caller treats those as it treats the SDK client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import encode_header_value, find_invalid_x_mcp_header, mcp_param_headers, x_mcp_header_map
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    ErrorData,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server import __version__

CLIENT_INFO = {"name": "castellan-gateway", "version": __version__}
ACCEPT = "application/json, text/event-stream"


class UpstreamProtocolError(RuntimeError):
    """The upstream answered with something that is not an MCP response to our request."""


@dataclass(frozen=True, slots=True)
class ToolCallResult:
    """A `tools/call` result as the upstream sent it (wire field names read by `UpstreamTool`)."""

    content: list[Any] = field(default_factory=list)
    structured_content: Any = None
    is_error: bool = False


def param_headers(input_schema: Any, arguments: Mapping[str, Any]) -> dict[str, str]:
    """The Mcp-Param-* headers a 2026-07-28 `tools/call` mirrors from its arguments (none for a
    schema the spec's rules refuse: conforming clients send none for it)."""
    if not isinstance(input_schema, Mapping) or find_invalid_x_mcp_header(input_schema) is not None:
        return {}
    return mcp_param_headers(x_mcp_header_map(input_schema), arguments)


def parse_response(content_type: str, body: bytes, request_id: int) -> dict[str, Any]:
    """The JSON-RPC response to `request_id`, from a JSON body or the SSE event that carries it."""
    if "text/event-stream" in content_type:
        for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
            if not data:
                continue
            message = json.loads(data)
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
        raise UpstreamProtocolError("the upstream's event stream ended without the response")
    message = json.loads(body) if body else None
    if not isinstance(message, dict) or message.get("id") != request_id:
        raise UpstreamProtocolError("the upstream's answer is not the response to the request")
    return message


def result_of(message: Mapping[str, Any]) -> ToolCallResult:
    """The call's result, or `MCPError` for an error response."""
    if "error" in message:
        error = message["error"] if isinstance(message["error"], dict) else {}
        raise MCPError.from_error_data(
            ErrorData(
                code=int(error.get("code", -32603)),
                message=str(error.get("message", "upstream error")),
                data=error.get("data"),
            )
        )
    result = message.get("result")
    if not isinstance(result, dict):
        raise UpstreamProtocolError("the upstream's response has no result")
    kind = result.get("resultType", "complete")
    if kind != "complete":
        # input_required & co. ask the caller for something; with nothing to relay there is no one to ask
        raise UpstreamProtocolError(f"the upstream answered {kind!r}, which this call cannot relay")
    content = result.get("content", [])
    if not isinstance(content, list):
        raise UpstreamProtocolError("the upstream's result content is not a list")
    return ToolCallResult(
        content=content, structured_content=result.get("structuredContent"), is_error=bool(result.get("isError"))
    )


class HttpUpstreamClient:
    """`tools/call` on one upstream over a persistent, pooled aiohttp session.

    `headers` are the gateway's own for this upstream (its credentials); `call_tool(headers=...)` adds
    per-call ones (a per-user credential) on that POST only. Never sends the agent's token.
    """

    def __init__(self, url: str, headers: Mapping[str, str], protocol_version: str, timeout_seconds: float) -> None:
        self.url = url
        self.protocol_version = protocol_version
        self.modern = protocol_version in MODERN_PROTOCOL_VERSIONS
        self._headers = {**headers, "accept": ACCEPT, "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._http: aiohttp.ClientSession | None = None
        self._session_headers: dict[str, str] | None = None
        self._session_lock = asyncio.Lock()
        self._ids = itertools.count(1)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
            self._http = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._http

    async def _post(self, body: dict[str, Any], headers: Mapping[str, str]) -> tuple[int, dict[str, Any] | None]:
        """POST one message; returns (status, the response to it or None for an empty acknowledgement)."""
        async with self._client().post(self.url, data=json.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            status, content_type = resp.status, resp.headers.get("content-type", "")
            if "id" not in body or status in (202, 404) or (status >= 400 and not raw):
                return status, None
            try:
                return status, parse_response(content_type, raw, body["id"])
            except ValueError:
                raise UpstreamProtocolError(f"HTTP {status} with a body that is not JSON") from None

    async def _handshake(self, stale: dict[str, str] | None) -> dict[str, str]:
        """The headers of this client's 2025-era session, opened if there is none (or only `stale`)."""
        async with self._session_lock:
            if self._session_headers is not None and self._session_headers is not stale:
                return self._session_headers
            request_id = next(self._ids)
            request = {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "initialize",
                "params": {"protocolVersion": self.protocol_version, "capabilities": {}, "clientInfo": CLIENT_INFO},
            }
            async with self._client().post(self.url, data=json.dumps(request), headers=self._headers) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise UpstreamProtocolError(f"initialize answered HTTP {resp.status}")
                answer = parse_response(resp.headers.get("content-type", ""), raw, request_id)
                session_id = resp.headers.get("mcp-session-id")
            if "result" not in answer:
                result_of(answer)  # raises the upstream's error
            version = str(answer["result"].get("protocolVersion", self.protocol_version))
            headers = {**self._headers, "mcp-protocol-version": version}
            if session_id:
                headers["mcp-session-id"] = session_id
            await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
            self._session_headers = headers
            return headers

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        input_schema: Any = None,
        headers: Mapping[str, str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> ToolCallResult:
        params: dict[str, Any] = {"name": name, "arguments": dict(arguments)}
        request_meta = dict(meta or {})
        if self.modern:
            request_meta |= {
                PROTOCOL_VERSION_META_KEY: self.protocol_version,
                CLIENT_INFO_META_KEY: CLIENT_INFO,
                CLIENT_CAPABILITIES_META_KEY: {},
            }
        if request_meta:
            params["_meta"] = request_meta
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": "tools/call", "params": params}
        if self.modern:
            routing = {
                "mcp-protocol-version": self.protocol_version,
                "mcp-method": "tools/call",
                "mcp-name": encode_header_value(name),
            }
            sent = {**self._headers, **routing, **param_headers(input_schema, arguments), **(headers or {})}
            status, answer = await self._post(body, sent)
        else:
            session = await self._handshake(None)
            status, answer = await self._post(body, {**session, **(headers or {})})
            if status == 404:  # the upstream forgot our session (restart, idle expiry): the call did not run
                session = await self._handshake(session)
                status, answer = await self._post(body, {**session, **(headers or {})})
        if answer is None:
            raise UpstreamProtocolError(f"the upstream answered HTTP {status} without a response")
        return result_of(answer)

    async def close(self) -> None:
        """Ends this client's 2025-era session (best effort) and closes its connection pool."""
        http, session = self._http, self._session_headers
        self._http, self._session_headers = None, None
        if http is None or http.closed:
            return
        if session is not None and "mcp-session-id" in session:
            with contextlib.suppress(Exception):
                async with http.delete(self.url, headers=session, timeout=aiohttp.ClientTimeout(total=2)):
                    pass
        await http.close()
