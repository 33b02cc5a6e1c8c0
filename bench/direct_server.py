"""The baseline: the same `echo` tool served by a plain `mcp` SDK low-level server, no governance.

Same transport settings as the gateway (streamable HTTP, JSON responses, DNS-rebinding protection on),
so the difference measured is Castellan's pipeline and edge. Run: python -m bench.direct_server PORT
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from starlette.applications import Starlette
from starlette.routing import Route

from server.transport import LOOPBACK_HOSTS, sdk_settings
from tools.echo import EchoTool

_ECHO = EchoTool().spec


async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(
        tools=[types.Tool(name=_ECHO.name, description=_ECHO.description, input_schema=dict(_ECHO.input_schema))]
    )


async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    text = str((params.arguments or {}).get("text", ""))
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content={"text": text})


def build() -> Starlette:
    server = Server("direct", on_list_tools=list_tools, on_call_tool=call_tool)
    origins = [f"http://{h}" for h in LOOPBACK_HOSTS]
    sessions = StreamableHTTPSessionManager(
        app=server, json_response=True, security_settings=sdk_settings(LOOPBACK_HOSTS, origins)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions.run():
            yield

    return Starlette(routes=[Route("/mcp", endpoint=StreamableHTTPASGIApp(sessions))], lifespan=lifespan)


if __name__ == "__main__":
    uvicorn.run(build(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
