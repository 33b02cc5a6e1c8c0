"""A lean MCP client for `tools/call` on one streamable-HTTP upstream, over pooled keep-alive connections.

The SDK `Client` costs about 1.2 ms of CPU per proxied call (its session, streams, pydantic models
and httpx), a pooled aiohttp POST about 0.45 ms, a request on this module's own pool
(`server.upstream.http_pool`: asyncio transports, httptools' parser) about 0.19 ms. This client
speaks only what a governed call with nothing to relay needs, in the era the upstream's SDK
connection negotiated:

- 2026-07-28: a self-contained POST with the request envelope in `_meta` and the routing headers
  (MCP-Protocol-Version, Mcp-Method, Mcp-Name, and Mcp-Param-* mirrored from the tool's input schema);
- 2025-era (handshake) versions: its own `initialize` session (Mcp-Session-Id), opened on first use
  and opened again once when the upstream has forgotten it (404: the call did not run).

It declares no client capabilities and sends no progress token, so an upstream cannot ask it for
sampling, elicitation or roots; a call that needs those goes through the SDK session (BOARD item 3).
Answers may be JSON or an SSE stream (notifications on it are dropped); a 307/308 redirect on the
same origin is followed (and remembered), one to another origin is refused (it would carry the
gateway's credentials there). Raises `MCPError` for a JSON-RPC error answer, `UpstreamProtocolError`
for an answer that is not MCP, and `UpstreamDisconnected`/`OSError`/`TimeoutError` for a broken
connection: the caller treats those as it treats the SDK client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import encode_header_value, find_invalid_x_mcp_header, mcp_param_headers, x_mcp_header_map
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    ErrorData,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server import __version__, json_exact
from server.upstream.http_pool import ConnectionPool, Response

CLIENT_INFO = {"name": "castellan-gateway", "version": __version__}
ACCEPT = "application/json, text/event-stream"
MAX_REDIRECTS = 3


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
    return _mirrored(header_map(input_schema), arguments)


def header_map(input_schema: Any) -> Any:
    """What `mcp_param_headers` mirrors for `input_schema` (None: nothing, or a schema the spec's rules refuse)."""
    if not isinstance(input_schema, Mapping) or find_invalid_x_mcp_header(input_schema) is not None:
        return None
    return x_mcp_header_map(input_schema) or None


def _mirrored(mapping: Any, arguments: Mapping[str, Any]) -> dict[str, str]:
    if not mapping:
        return {}
    return mcp_param_headers(mapping, arguments)


def parse_response(content_type: str, body: bytes, request_id: int) -> dict[str, Any]:
    """The JSON-RPC response to `request_id`, from a JSON body or the SSE event that carries it."""
    if "text/event-stream" in content_type:
        for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
            if not data:
                continue
            message = json_exact.loads(data)  # orjson where it reads as json does
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
        raise UpstreamProtocolError("the upstream's event stream ended without the response")
    message = json_exact.loads(body) if body else None
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
    """`tools/call` on one upstream over a pool of persistent connections.

    `headers` are the gateway's own for this upstream (its credentials); `call_tool(headers=...)` adds
    per-call ones (a per-user credential) on that POST only. Never sends the agent's token.
    """

    def __init__(self, url: str, headers: Mapping[str, str], protocol_version: str, timeout_seconds: float) -> None:
        self.url = url
        self.protocol_version = protocol_version
        self.modern = protocol_version in MODERN_PROTOCOL_VERSIONS
        own = {name.lower(): value for name, value in headers.items()}
        self._headers = {**own, "accept": ACCEPT, "content-type": "application/json"}
        self._timeout = timeout_seconds
        self._pool: ConnectionPool | None = None
        self._pool_url: str | None = None
        self._pool_target = ""
        """The URL the pool and request target were worked out for (a redirect moves `url`)."""
        self._session_headers: dict[str, str] | None = None
        self._session_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._maps: dict[str, tuple[Any, Any]] = {}
        """Tool name → (its input schema, that schema's `header_map`): worked out once per listing."""

    def _param_headers(self, name: str, input_schema: Any, arguments: Mapping[str, Any]) -> dict[str, str]:
        cached = self._maps.get(name)
        if cached is None or cached[0] is not input_schema:
            cached = self._maps[name] = (input_schema, header_map(input_schema))
        return {header.lower(): value for header, value in _mirrored(cached[1], arguments).items()}

    def _connections(self) -> tuple[ConnectionPool, str]:
        """The pool for `self.url`'s origin (made again when the URL moved to another) and the request target."""
        if self._pool is not None and self._pool_url == self.url:
            return self._pool, self._pool_target  # parsed once, not twice a call
        if self._pool is None or not self._pool.origin_of(self.url):
            if self._pool is not None:
                self._pool.close()
            self._pool = ConnectionPool(self.url)
        self._pool_url, self._pool_target = self.url, _target(self.url)
        return self._pool, self._pool_target

    async def _send(self, method: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """One request; a 307/308 to the same origin is followed (and kept as the URL from then on)."""
        for _ in range(MAX_REDIRECTS + 1):
            pool, target = self._connections()
            response = await pool.request(method, target, headers, body, self._timeout)
            location = response.headers.get("location")
            if response.status not in (307, 308) or not location:
                return response
            moved = urljoin(self.url, location)
            if not pool.origin_of(moved):
                raise UpstreamProtocolError(f"the upstream redirected to another origin ({moved}); not followed")
            self.url = moved
        raise UpstreamProtocolError(f"the upstream redirected more than {MAX_REDIRECTS} times")

    async def _post(self, body: dict[str, Any], headers: Mapping[str, str]) -> tuple[int, dict[str, Any] | None]:
        """POST one message; returns (status, the response to it or None for an empty acknowledgement)."""
        resp = await self._send("POST", json.dumps(body).encode(), headers)
        raw, status, content_type = resp.body, resp.status, resp.headers.get("content-type", "")
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
            resp = await self._send("POST", json.dumps(request).encode(), self._headers)
            if resp.status != 200:
                raise UpstreamProtocolError(f"initialize answered HTTP {resp.status}")
            answer = parse_response(resp.headers.get("content-type", ""), resp.body, request_id)
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
        extra = {name.lower(): value for name, value in headers.items()} if headers else {}
        if self.modern:
            routing = {
                "mcp-protocol-version": self.protocol_version,
                "mcp-method": "tools/call",
                "mcp-name": encode_header_value(name),
            }
            mirrored = self._param_headers(name, input_schema, arguments)
            status, answer = await self._post(body, {**self._headers, **routing, **mirrored, **extra})
        else:
            session = await self._handshake(None)
            status, answer = await self._post(body, {**session, **extra})
            if status == 404:  # the upstream forgot our session (restart, idle expiry): the call did not run
                session = await self._handshake(session)
                status, answer = await self._post(body, {**session, **extra})
        if answer is None:
            raise UpstreamProtocolError(f"the upstream answered HTTP {status} without a response")
        return result_of(answer)

    async def close(self) -> None:
        """Ends this client's 2025-era session (best effort) and closes its connections."""
        pool, session = self._pool, self._session_headers
        self._pool, self._session_headers, self._pool_url = None, None, None
        if pool is None:
            return
        if session is not None and "mcp-session-id" in session:
            with contextlib.suppress(Exception):
                await pool.request("DELETE", _target(self.url), session, b"", 2.0)
        pool.close()


def _target(url: str) -> str:
    """The request target (path and query) of `url`."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
