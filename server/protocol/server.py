"""The MCP server the HTTP edge mounts: the SDK's low-level server with Castellan's handlers."""

from __future__ import annotations

from typing import Any

from mcp.server.lowlevel import Server

from server import __version__
from server.protocol.surface import GatewayServer, Surface
from server.protocol.tools import INSTRUCTIONS, McpHandlers, UnreadCallRecorder
from server.registry import ToolRegistry


def build_mcp_server(handlers: McpHandlers, registry: ToolRegistry, surface: Surface | None = None) -> Server[Any]:
    def input_schema(name: str) -> dict[str, Any] | None:
        # For the SDK's Mcp-Param header check (2026-07-28). Without it the SDK runs our whole
        # tools/list handler, with its per-tool policy decisions, on every call.
        tool = registry.get(name)
        return dict(tool.spec.input_schema) if tool is not None else None

    server: Server[Any] = GatewayServer(
        "castellan",
        version=__version__,
        title="Castellan MCP gateway",
        instructions=INSTRUCTIONS,
        on_list_tools=handlers.list_tools,
        # a task's CreateTaskResult is a dict: an extension's result shape, which the SDK's types do not name
        on_call_tool=handlers.call_tool,  # type: ignore[arg-type]
        get_tool_input_schema=input_schema,
    )
    server.middleware.append(UnreadCallRecorder(handlers))
    if surface is not None:  # resources, prompts, completions: registered as sources serve them
        surface.attach(server)
    tasks = getattr(handlers, "tasks", None)
    if tasks is not None:  # the tasks extension (2026-07-28): tasks/get, tasks/update, tasks/cancel
        tasks.attach(server)
    relaying = getattr(handlers, "relaying", None)
    if relaying is not None:  # inside the recorder: a tampered requestState is recorded as refused
        server.middleware.append(relaying.boundary)
    return server
