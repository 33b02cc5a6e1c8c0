"""The edge's lean path serves only plain 2026-07-28 JSON tools/call and tools/list that nothing can be
relayed to; everything else reaches the SDK with its body intact."""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
import pytest
from starlette.types import Message, Receive, Scope, Send

from server.protocol.fast import FastEdge, fast_route
from server.protocol.server import build_mcp_server
from server.registry import ToolRegistry
from server.transport import LOOPBACK_HOSTS, sdk_settings
from tools.echo import EchoTool

pytestmark = pytest.mark.anyio

VERSION = "2026-07-28"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": VERSION,
    "io.modelcontextprotocol/clientInfo": {"name": "agent", "version": "7"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def call_body(meta: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    p = {"name": "echo", "arguments": {"text": "hi"}, "_meta": {**ENVELOPE, **(meta or {})}, **params}
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": p}


def call_headers(**extra: str) -> dict[str, str]:
    return {
        "host": "127.0.0.1:8750",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": VERSION,
        "mcp-method": "tools/call",
        "mcp-name": "echo",
        **extra,
    }


class Handlers:
    """Stands in for McpHandlers: records what it was given, answers like it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, Any]] = []

    async def call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        info = ctx.session.client_params.client_info if ctx.session.client_params else None
        self.seen.append(("call", params, info))
        text = str((params.arguments or {}).get("text"))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content={"t": text})

    async def list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        self.seen.append(("list", params, None))
        return types.ListToolsResult(tools=[types.Tool(name="echo", input_schema={"type": "object"})])


class Sdk:
    """Stands in for the SDK's session manager: records the body it received."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def serve(body: Any, headers: dict[str, str]) -> tuple[Handlers, Sdk, int, Any]:
    handlers, sdk = Handlers(), Sdk()
    registry = ToolRegistry([EchoTool()])
    server = build_mcp_server(handlers, registry)  # type: ignore[arg-type]
    origins = [f"http://{h}" for h in LOOPBACK_HOSTS]
    edge = FastEdge(sdk, handlers, registry, server, sdk_settings(LOOPBACK_HOSTS, origins), json_response=True)  # type: ignore[arg-type]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/mcp",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await edge(scope, receive, send)
    status = sent[0]["status"]
    payload = sent[1].get("body", b"")
    return handlers, sdk, status, json.loads(payload) if status == 200 else payload


async def test_a_plain_modern_call_is_served_with_the_sdks_wire_shape() -> None:
    handlers, sdk, status, answer = await serve(call_body(), call_headers())
    assert not sdk.bodies
    assert status == 200
    assert answer["id"] == 7
    result = answer["result"]
    assert result["content"] == [{"type": "text", "text": "hi"}]
    assert result["structuredContent"] == {"t": "hi"}
    assert result["resultType"] == "complete"
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "castellan"
    kind, _, info = handlers.seen[0]
    assert kind == "call"
    assert info.name == "agent"
    assert info.version == "7"


async def test_a_plain_modern_list_is_served() -> None:
    body = {"jsonrpc": "2.0", "id": "a", "method": "tools/list", "params": {"_meta": ENVELOPE}}
    headers = call_headers(**{"mcp-method": "tools/list"})
    del headers["mcp-name"]
    _handlers, sdk, status, answer = await serve(body, headers)
    assert not sdk.bodies
    assert status == 200
    assert answer["result"]["tools"][0]["name"] == "echo"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(call_body({"progressToken": "p1"}), call_headers(), id="progress token"),
        pytest.param(
            call_body({"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}), call_headers(), id="sampling"
        ),
        pytest.param(
            call_body({"io.modelcontextprotocol/clientCapabilities": {"elicitation": {}}}),
            call_headers(),
            id="elicitation",
        ),
        pytest.param(
            call_body({"io.modelcontextprotocol/clientCapabilities": {"roots": {}}}), call_headers(), id="roots"
        ),
        pytest.param(call_body({"io.modelcontextprotocol/logLevel": "debug"}), call_headers(), id="log level"),
        pytest.param(call_body(task={"ttl": 1000}), call_headers(), id="task"),
        pytest.param(call_body(), call_headers(**{"mcp-name": "other"}), id="header mismatch"),
        pytest.param(call_body(), call_headers(**{"mcp-protocol-version": "2025-11-25"}), id="2025 era"),
        pytest.param(call_body(), call_headers(accept="text/event-stream"), id="no json accept"),
        pytest.param(call_body(), call_headers(**{"content-type": "text/plain"}), id="content type"),
        pytest.param(call_body(), call_headers(host="evil.example:80"), id="foreign host"),
        pytest.param(b"{not json", call_headers(), id="unparseable"),
        pytest.param([call_body()], call_headers(), id="batch"),
        pytest.param({**call_body(), "method": "prompts/list"}, call_headers(), id="other method"),
        pytest.param(call_body(name=3), call_headers(), id="invalid params"),
        pytest.param(call_body(arguments=[1]), call_headers(), id="arguments not an object"),
    ],
)
async def test_anything_else_reaches_the_sdk_with_its_body(body: Any, headers: dict[str, str]) -> None:
    handlers, sdk, status, _ = await serve(body, headers)
    assert status == 299
    assert not handlers.seen
    assert sdk.bodies == [body if isinstance(body, bytes) else json.dumps(body).encode()]


def test_the_route_names_the_envelope_it_read() -> None:
    route = fast_route(call_body(), call_headers())
    assert route is not None
    assert route.protocol_version == VERSION
    assert route.client_info == {"name": "agent", "version": "7"}
