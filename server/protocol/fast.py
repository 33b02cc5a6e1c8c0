"""The edge's lean path: a plain 2026-07-28 JSON `tools/call` or `tools/list` served without the SDK
server's per-request machinery, when nothing can be relayed to the caller.

The SDK's single-exchange path builds, per request, a security middleware, request models, a dispatch
context, a connection, a runner, a session, a request context and a middleware chain, then validates
and re-dumps the result through pydantic models: about 0.3 ms of CPU, against ~0.03 ms for the handler
call itself. This path runs the same checks in the same order with the SDK's own functions (content
type, Host/Origin, Accept, the JSON-RPC shape, duplicated routing headers, the envelope ladder, the
surface validation of the params, the Mcp-Param header check) and calls the same handlers. It answers
only a request every check accepts and `relay_needed` says cannot be relayed to; anything else — an
error to report, another method, the 2025-era session protocol, an SSE response, a progress token, a
client that can be asked for sampling, elicitation or roots, a log level, a task — goes to the SDK
path unchanged (the body it read is replayed), so every error and every other feature is the SDK's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import mcp_types as types
import structlog
from mcp.server.lowlevel import Server
from mcp.server.runner import modern_error_data
from mcp.server.streamable_http import check_accept_headers
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PARAM_HEADER_PREFIX,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
    validate_mcp_param_headers,
)
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY
from mcp_types import methods as surface
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol.tools import McpHandlers
from server.registry import ToolRegistry
from server.relay.needed import relay_needed

log = structlog.get_logger("castellan.edge")

SERVED = frozenset({"tools/call", "tools/list"})
ENVELOPE_KEYS = frozenset({PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY})
PARAM_KEYS = {"tools/call": frozenset({"name", "arguments", "_meta"}), "tools/list": frozenset({"cursor", "_meta"})}
_VERSION_HEADER = b"mcp-protocol-version"
_PARAM_PREFIX = MCP_PARAM_HEADER_PREFIX.lower()


@dataclass(frozen=True, slots=True)
class _ClientParams:
    client_info: Any
    capabilities: Any


@dataclass(frozen=True, slots=True)
class _Session:
    client_params: _ClientParams | None


@dataclass(frozen=True, slots=True)
class _Context:
    """What the handlers read from the SDK's `ServerRequestContext` (request, session.client_params,
    method, params, request_id), for a request served here."""

    request: Request
    session: _Session
    method: str
    params: dict[str, Any]
    request_id: str | int
    meta: Mapping[str, Any] = field(default_factory=dict)


def fast_route(body: Any, headers: Mapping[str, str]) -> InboundModernRoute | None:
    """The request's envelope when this path may serve `body`, else None (the SDK serves it).

    `headers` are the request's, keyed by lowercase name. Pure: no I/O.
    """
    if not isinstance(body, dict) or body.keys() - {"jsonrpc", "id", "method", "params"}:
        return None
    request_id, method, params = body.get("id"), body.get("method"), body.get("params")
    if body.get("jsonrpc") != "2.0" or method not in SERVED or not isinstance(params, dict):
        return None
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        return None
    if params.keys() - PARAM_KEYS[method]:
        return None  # a task, request state, or anything else this path does not know
    verdict = classify_inbound_request(body, headers=headers)
    if not isinstance(verdict, InboundModernRoute):
        return None
    meta = params["_meta"]
    if any(k.startswith("io.modelcontextprotocol/") and k not in ENVELOPE_KEYS for k in meta):
        return None  # a log level, or any other protocol-level ask this path does not serve
    capabilities = verdict.client_capabilities
    if not isinstance(capabilities, dict) or relay_needed(capabilities, meta):
        return None
    return verdict


class FastEdge:
    """ASGI app in front of the SDK's session manager (behind authentication): serves what
    `fast_route` accepts, hands everything else to `sdk` with the request body replayed."""

    def __init__(
        self,
        sdk: ASGIApp,
        handlers: McpHandlers,
        registry: ToolRegistry,
        server: Server[Any],
        security: TransportSecuritySettings,
        *,
        json_response: bool,
    ) -> None:
        self._sdk = sdk
        self._handlers = handlers
        self._registry = registry
        self._server = server
        self._security = TransportSecurityMiddleware(security)
        # the SDK deep-copies it per response; here it is serialized at once and never mutated
        self._server_info = server.server_info_stamp
        # SSE responses, and cache hints (none are configured), are the SDK's
        self._enabled = json_response and not server.cache_hints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._enabled or scope["type"] != "http" or scope["method"] != "POST" or not _modern(scope):
            await self._sdk(scope, receive, send)
            return
        chunks: list[bytes] = []
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not await self._serve(scope, body, send):

            async def replay() -> Message:
                return messages.pop(0) if messages else await receive()

            await self._sdk(scope, replay, send)

    async def _serve(self, scope: Scope, raw: bytes, send: Send) -> bool:
        """Answers the request and returns True, or returns False having sent nothing."""
        request = Request(scope)
        if await self._security.validate_request(request, is_post=True) is not None:
            return False
        if not check_accept_headers(request)[0]:
            return False
        if find_duplicated_routing_header((k.decode("latin-1"), "") for k, _ in scope["headers"]) is not None:
            return False
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        headers = dict(request.headers)
        verdict = fast_route(body, headers)
        if verdict is None:
            return False
        method, params, version = body["method"], body["params"], verdict.protocol_version
        try:
            surface.validate_client_request(method, version, params)
            typed = (
                types.CallToolRequestParams.model_validate(params, by_name=False)
                if method == "tools/call"
                else types.PaginatedRequestParams.model_validate(params, by_name=False)
            )
        except (ValidationError, KeyError):
            return False  # the SDK refuses it (and the recorder records the refused call)
        if method == "tools/call" and self._param_headers_refused(params, headers):
            return False
        ctx = _Context(
            request=request,
            session=_Session(_client_params(verdict)),
            method=method,
            params=params,
            request_id=body["id"],
        )
        status = 200
        try:
            if method == "tools/call":
                result: Any = await self._handlers.call_tool(cast(Any, ctx), cast(types.CallToolRequestParams, typed))
            else:
                result = await self._handlers.list_tools(cast(Any, ctx), cast(types.PaginatedRequestParams, typed))
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": body["id"], "result": self._wire(method, version, result)}
        except Exception as exc:  # as the SDK's single-exchange path: a JSON-RPC error, never a traceback
            error = modern_error_data(exc)
            answer = {"jsonrpc": "2.0", "id": body["id"], "error": error.model_dump(mode="json", exclude_none=True)}
            status = ERROR_CODE_HTTP_STATUS.get(error.code, 200)  # as the SDK: e.g. -32021 is a 400
        payload = json.dumps(answer, separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return True

    def _param_headers_refused(self, params: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
        """The SDK's Mcp-Param check: a header that disagrees with its argument is the SDK's to refuse."""
        arguments = params.get("arguments") or {}
        if not isinstance(arguments, Mapping):
            return True
        if not arguments and not any(h.startswith(_PARAM_PREFIX) for h in headers):
            return False
        tool = self._registry.get(params["name"]) if isinstance(params.get("name"), str) else None
        if tool is None:
            return False
        return validate_mcp_param_headers(dict(tool.spec.input_schema), arguments, headers) is not None

    def _wire(self, method: str, version: str, result: Any) -> dict[str, Any]:
        """The result as the SDK puts it on the wire: dumped, sieved by the version's surface, with
        `resultType` and the `serverInfo` stamp."""
        dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        dumped = surface.serialize_server_result(method, version, dumped)
        dumped.setdefault("resultType", "complete")
        meta = dumped.get("_meta")
        if meta is None:
            dumped["_meta"] = {types.SERVER_INFO_META_KEY: self._server_info}
        elif isinstance(meta, dict) and meta.get(types.SERVER_INFO_META_KEY) is None:
            dumped["_meta"] = {**meta, types.SERVER_INFO_META_KEY: self._server_info}
        return dict(dumped)


def _modern(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == _VERSION_HEADER:
            return value.decode("latin-1") in MODERN_PROTOCOL_VERSIONS
    return False


def _client_params(verdict: InboundModernRoute) -> _ClientParams | None:
    """The envelope's client info and capabilities as the SDK's models, as its connection holds them:
    both, or none when either is missing or mis-shaped (the handlers then record an unnamed client)."""
    try:
        info = types.Implementation.model_validate(verdict.client_info, by_name=False)
        capabilities = types.ClientCapabilities.model_validate(verdict.client_capabilities, by_name=False)
    except ValidationError:
        return None
    return _ClientParams(info, capabilities)
