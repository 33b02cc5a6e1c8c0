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

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import anyio
import mcp_types as types
import orjson
import structlog
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.lowlevel import Server
from mcp.server.request_state import RequestStateBoundary
from mcp.server.runner import ServerRunner, modern_error_data
from mcp.server.streamable_http import REQUEST_CANCELLED, check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import NoBackChannelError
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PARAM_HEADER_PREFIX,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
    validate_mcp_param_headers,
)
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    INTERNAL_ERROR,
    PROTOCOL_VERSION_META_KEY,
    ErrorData,
    JSONRPCError,
    JSONRPCRequest,
    jsonrpc_message_adapter,
)
from mcp_types import methods as surface
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.after_response import answering
from server.protocol.fast_sessions import Flights, SessionConnections, Sessions
from server.protocol.logging import LogLevels
from server.protocol.notifications import SessionTracker
from server.protocol.tools import McpHandlers, UnreadCallRecorder
from server.registry import ToolRegistry
from server.relay.needed import relay_needed
from server.request_body import Body, buffered

log = structlog.get_logger("castellan.edge")

SERVED = frozenset({"tools/call", "tools/list"})
ENVELOPE_KEYS = frozenset({PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY})
PARAM_KEYS = {"tools/call": frozenset({"name", "arguments", "_meta"}), "tools/list": frozenset({"cursor", "_meta"})}
KNOWN_MIDDLEWARE = (
    OpenTelemetryMiddleware,
    UnreadCallRecorder,
    RequestStateBoundary,
    SessionTracker,
    SessionConnections,
)
"""SDK server middleware the 2026-07-28 path may skip for a plain call: each passes it through untouched
(the OpenTelemetry span aside: with no tracer provider configured it is a no-op)."""
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
        sessions: StreamableHTTPSessionManager | None = None,
        levels: LogLevels | None = None,
    ) -> None:
        """`sessions`: the SDK's session manager, for the 2025-era lean path (None: 2025 is the SDK's).
        `levels`: the log levels 2025 sessions set (a session that set one is the SDK's to serve)."""
        self._sdk = sdk
        self._handlers = handlers
        self._registry = registry
        self._server = server
        self._security = TransportSecurityMiddleware(security)
        # the SDK deep-copies it per response; here it is serialized at once and never mutated
        self._server_info = server.server_info_stamp
        # SSE responses, and cache hints (none are configured), are the SDK's
        self._enabled = json_response and not server.cache_hints
        unknown = [type(m).__name__ for m in server.middleware if not isinstance(m, KNOWN_MIDDLEWARE)]
        # the 2026-07-28 path calls the handlers without the SDK's server middleware: only while every
        # middleware installed is one shown to leave a plain call alone (the 2025 path runs them all)
        self._modern = self._enabled and not unknown
        if unknown:
            log.info("fast_path_modern_off", reason=f"SDK server middleware it does not know: {', '.join(unknown)}")
        self._manager = sessions
        self._sessions: Sessions | None = None
        self._levels = levels
        self._flights = Flights()
        self.served = 0
        """Requests answered here (for tests and the bench: which path answered)."""
        if self._enabled and sessions is not None and sessions.json_response and not sessions.stateless:
            connections = SessionConnections()
            server.middleware.append(connections)  # learns each session's connection from its handshake
            self._sessions = Sessions(sessions, connections)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._enabled or scope["type"] != "http" or scope["method"] != "POST":
            await self._sdk(scope, receive, send)
            return
        version = _version(scope)
        if version in MODERN_PROTOCOL_VERSIONS and self._modern:
            serve = self._serve
        elif self._sessions is not None and (version is None or version in HANDSHAKE_PROTOCOL_VERSIONS):
            serve = self._serve_session
        else:
            await self._sdk(scope, receive, send)
            return
        body, receive = await buffered(scope, receive)
        with answering():  # what the call leaves for after its response (its outcome) runs once it is sent
            served = await serve(scope, body, send)
        if not served:
            await self._sdk(scope, receive, send)

    async def _serve(self, scope: Scope, raw: Body, send: Send) -> bool:
        """A 2026-07-28 request: answers it and returns True, or returns False having sent nothing."""
        request = Request(scope)
        if await self._security.validate_request(request, is_post=True) is not None:
            return False
        if not check_accept_headers(request)[0]:
            return False
        if find_duplicated_routing_header((k.decode("latin-1"), "") for k, _ in scope["headers"]) is not None:
            return False
        body = raw.message()
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
        payload = _encode(answer)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        self.served += 1
        return True

    async def _serve_session(self, scope: Scope, raw: Body, send: Send) -> bool:
        """A request on a 2025-era session: answers a plain `tools/call` or `tools/list` as the SDK's
        transport, dispatcher and runner would and returns True, or returns False having sent nothing.

        The SDK's own kernel (`ServerRunner`) runs the request over the session's real connection, so the
        init gate, the params validation, the server middleware (the unread-call recorder among them),
        the handler and the result's wire shape are the SDK's; what is skipped is the transport's
        memory streams, the dispatcher's task and the response models."""
        assert self._sessions is not None
        request = Request(scope)
        if await self._security.validate_request(request, is_post=True) is not None:
            return False
        session = self._sessions.find(scope, request.headers)
        if session is None:
            return False
        message = raw.message()
        if not isinstance(message, dict):
            return False
        if message.get("method") == "notifications/cancelled":
            self._flights.cancel(session.session_id, message.get("params"))
            return False  # the SDK acknowledges it (and cancels what it runs itself)
        if not check_accept_headers(request)[0] or not _json_content(request.headers.get("content-type", "")):
            return False
        route = session_route(message)
        if route is None:
            return False
        request_id, method, params = route
        try:
            parsed = jsonrpc_message_adapter.validate_python(message, by_name=False)
        except ValidationError:
            return False
        if not isinstance(parsed, JSONRPCRequest):
            return False
        connection = session.connection
        capabilities = connection.client_capabilities
        declared = capabilities.model_dump(exclude_none=True) if capabilities is not None else {}
        level_set = self._levels is not None and self._levels.connection_level(connection) is not None
        if relay_needed(declared, (params or {}).get("_meta"), log_level_set=level_set):
            return False
        runner: ServerRunner[Any] = ServerRunner(
            self._server, connection, getattr(self._manager, "_lifespan_state", None)
        )
        dctx = _SessionDispatch(request_id, ServerMessageMetadata(request_context=request, can_send_request=False))
        status_body: bytes
        with self._sessions.in_flight(session):
            try:
                cancelled, result = await self._flights.run(
                    session.session_id, request_id, _on_request(runner)(dctx, method, params)
                )
            except Exception as exc:  # as the SDK's dispatcher: the exception's error, or code 0
                error = handler_exception_to_error_data(exc)
                if error is None:
                    log.exception("handler_raised", method=method)
                    error = ErrorData(code=0, message=str(exc))
                status_body = _error_body(request_id, error)
            else:
                if cancelled:
                    status_body = _error_body(
                        request_id, ErrorData(code=REQUEST_CANCELLED, message="Request cancelled")
                    )
                else:
                    status_body = _encode({"jsonrpc": "2.0", "id": request_id, "result": result})
        if session.transport.is_terminated:  # the session ended while the request ran: as the SDK answers
            response = session.transport._create_error_response(
                "Session terminated before the request completed", HTTPStatus.INTERNAL_SERVER_ERROR, INTERNAL_ERROR
            )
            await response(scope, _no_body, send)
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-length", str(len(status_body)).encode()),
                        (b"content-type", b"application/json"),
                        (b"mcp-session-id", session.session_id.encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": status_body})
        self.served += 1
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


def session_route(message: dict[str, Any]) -> tuple[str | int, str, dict[str, Any] | None] | None:
    """(id, method, params) of a plain 2025-era `tools/call` or `tools/list` request the lean path may
    serve, else None (the SDK serves it). Pure."""
    if message.keys() - {"jsonrpc", "id", "method", "params"} or message.get("jsonrpc") != "2.0":
        return None
    request_id, method, params = message.get("id"), message.get("method"), message.get("params")
    if method not in SERVED or isinstance(request_id, bool) or not isinstance(request_id, str | int):
        return None
    if params is None and method == "tools/list" and "params" not in message:
        return request_id, method, None
    if not isinstance(params, dict) or params.keys() - PARAM_KEYS[method]:
        return None  # a task, or anything else this path does not know
    meta = params.get("_meta", {})
    if not isinstance(meta, dict) or any(k.startswith("io.modelcontextprotocol/") for k in meta):
        return None
    return request_id, method, params


_NO_BACK_CHANNEL = TransportContext(kind="streamable-http", can_send_request=False)


@dataclass(slots=True)
class _SessionDispatch:
    """The dispatch context of a request served on the lean 2025 path, as the SDK's dispatcher makes it
    for a JSON-response POST: no server-to-client request on the request's own channel (the JSON body
    carries only the response; the relay and the SDK use the session's GET stream), and request-scoped
    notifications dropped, as that transport drops them."""

    _request_id: str | int
    message_metadata: ServerMessageMetadata
    transport: TransportContext = field(default_factory=lambda: _NO_BACK_CHANNEL)
    _cancel_requested: anyio.Event | None = None

    @property
    def cancel_requested(self) -> anyio.Event:
        """Made on first ask (nothing on this path asks unless a handler does): `anyio.Event()` looks
        up the running async library each time, ~4 µs a request."""
        if self._cancel_requested is None:
            self._cancel_requested = anyio.Event()
        return self._cancel_requested

    @property
    def request_id(self) -> str | int:
        return self._request_id

    @property
    def can_send_request(self) -> bool:
        return False

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None, opts: Any = None) -> Any:
        raise NoBackChannelError(method)

    async def notify(self, method: str, params: Mapping[str, Any] | None, opts: Any = None) -> None:
        return None

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        return None


# `ServerRunner.on_request` without caching it on the runner: a cached bound method is a cycle (runner ->
# its dict -> the method -> runner) that only the cyclic collector frees, once per request here.
_on_request = cast("functools.cached_property[Any]", vars(ServerRunner)["on_request"]).func


def _encode(answer: dict[str, Any]) -> bytes:
    """A JSON-RPC answer as compact JSON, as UTF-8 (as the SDK's pydantic encoder writes it): orjson,
    ~1 µs against the json module's ~6 µs for a tool result. What orjson refuses (an integer past
    64 bits, a lone surrogate) is written by the json module, as before (non-ASCII as escapes); the
    results here are JSON-mode dumps, so no NaN or non-JSON type reaches either."""
    try:
        return orjson.dumps(answer)
    except TypeError:
        return json.dumps(answer, separators=(",", ":")).encode()


def _error_body(request_id: str | int, error: ErrorData) -> bytes:
    return (
        JSONRPCError(jsonrpc="2.0", id=request_id, error=error)
        .model_dump_json(by_alias=True, exclude_unset=True)
        .encode()
    )


def _json_content(content_type: str) -> bool:
    """The SDK transport's Content-Type check."""
    return any(part.strip() == "application/json" for part in content_type.split(";")[0].split(","))


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _version(scope: Scope) -> str | None:
    """The request's MCP-Protocol-Version header (the first, as the SDK's manager reads it)."""
    for key, value in scope["headers"]:
        if key == _VERSION_HEADER:
            return str(value.decode("latin-1"))
    return None


def _client_params(verdict: InboundModernRoute) -> _ClientParams | None:
    """The envelope's client info and capabilities as the SDK's models, as its connection holds them:
    both, or none when either is missing or mis-shaped (the handlers then record an unnamed client)."""
    try:
        info = types.Implementation.model_validate(verdict.client_info, by_name=False)
        capabilities = types.ClientCapabilities.model_validate(verdict.client_capabilities, by_name=False)
    except ValidationError:
        return None
    return _ClientParams(info, capabilities)
