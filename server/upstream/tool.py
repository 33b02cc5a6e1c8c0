"""An upstream MCP tool served by the gateway under `<upstream>.<tool>`, subject to its pin."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import MISSING_REQUIRED_CLIENT_CAPABILITY

from server.content import as_text, block_parts
from server.errors import CastellanError
from server.invoke import caller
from server.registry import ToolOutput, ToolSpec
from server.relay.relay import RelayRefused, active_relay
from server.settings import UpstreamSettings
from server.tasks.support import task_support_of
from server.upstream.connection import UpstreamConnection
from server.upstream.http_client import ToolCallResult
from server.upstream.pins import Status


def definition_of(tool: Any) -> dict[str, Any]:
    """What is pinned: everything an agent (or its model) reads about the tool."""
    annotations = getattr(tool, "annotations", None)
    definition = {
        "name": tool.name,
        "title": getattr(tool, "title", None),
        "description": tool.description or "",
        "input_schema": _dump(getattr(tool, "inputSchema", None) or getattr(tool, "input_schema", None)),
        "output_schema": _dump(getattr(tool, "outputSchema", None) or getattr(tool, "output_schema", None)),
        "annotations": _dump(annotations),
    }
    # Task support only when declared, so the pins of tools that declare none are unchanged.
    declared = {"meta": _dump(getattr(tool, "meta", None)), "execution": _dump(getattr(tool, "execution", None))}
    support = task_support_of(declared)
    if support != "forbidden":
        definition["task_support"] = support
    return definition


def _dump(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return json.loads(json.dumps(value, default=str))


class UpstreamTool:
    """Blocked (hidden from tools/list, denied on tools/call with the reason) while its pin is
    quarantined or its definition is refused (`refused`: an input schema that cannot be validated
    safely). Raises `ConfigError` for a name or securable the gateway cannot serve."""

    def __init__(
        self,
        connection: UpstreamConnection,
        definition: dict[str, Any],
        status: Status = "quarantined",
        refused: str | None = None,
    ) -> None:
        settings = connection.settings
        self._connection = connection
        self.upstream_name = definition["name"]
        self.definition = definition
        self.status = status
        self.refused = refused
        annotations = dict(definition.get("annotations") or {})
        for key in ("title",):
            annotations.pop(key, None)
        self.spec = ToolSpec(
            name=f"{settings.tool_prefix}{self.upstream_name}"[:128],
            title=definition.get("title"),
            description=definition.get("description") or "",
            securable=securable_of(settings, self.upstream_name),
            input_schema=definition.get("input_schema") or {"type": "object"},
            output_schema=definition.get("output_schema"),
            annotations=annotations,
            upstream=settings.name,
            task_support=definition.get("task_support") or "forbidden",
        )

    def upstream_input(self) -> dict[str, Any]:
        """`input.upstream` of the decision input: the upstream, and which credential the call would carry."""
        return {"name": self._connection.name, "credential": self._connection.credential.mode}

    def blocked_reason(self) -> str | None:
        if self.refused:
            return f"upstream tool {self.spec.name} is refused: {self.refused}"
        if self.status == "quarantined":
            return (
                f"upstream tool {self.spec.name} is quarantined: its definition changed (or was never approved); "
                f"an admin must review and approve it (castellan tools approve {self.spec.name})"
            )
        return None

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        try:
            headers = await self._connection.credential.headers_for(caller.get())
        except CastellanError as exc:  # no credential for this caller (how to get one), or its service is down
            return ToolOutput(text="; ".join(exc.reasons), is_error=True)
        relay = active_relay.get()
        try:  # with a relay, what the upstream raises during the call reaches the agent
            result = await self._connection.call_tool(
                self.upstream_name, dict(arguments), headers=headers,
                relay=relay if relay is not None and relay.relays else None,
            )  # fmt: skip
        except RelayRefused as refused:  # the gateway refused what the tool asked of the agent
            return ToolOutput(text=json.dumps(refused.body), is_error=True)
        except MCPError as exc:
            if relay is not None:  # a task that ends so has failed (server/protocol/tasks.py)
                relay.upstream_error = exc.error
            if exc.error.code != MISSING_REQUIRED_CLIENT_CAPABILITY or relay is None:
                raise
            # the tool needs a capability the agent did not declare: the agent is told so as the
            # protocol error it is (2026-07-28), after the call is recorded
            relay.protocol_error = exc.error
            return ToolOutput(
                text=f"tool {self.spec.name} needs a client capability: {exc.error.message}", is_error=True
            )
        # the lean client's blocks are fresh from the wire; the SDK client's are models
        blocks = list(result.content) if isinstance(result, ToolCallResult) else [_dump(c) for c in result.content]
        structured = getattr(result, "structuredContent", None) or getattr(result, "structured_content", None)
        text = as_text(tuple(block_parts(blocks)))
        if not text and structured is not None:
            text = json.dumps(structured)
        is_error = bool(getattr(result, "isError", None) or getattr(result, "is_error", False))
        rich = any(b.get("type") != "text" for b in blocks)
        return ToolOutput(
            text=text,
            structured=structured if not is_error else None,
            is_error=is_error,
            content=tuple(blocks) if rich else (),
        )


def securable_of(settings: UpstreamSettings, upstream_name: str) -> str:
    """The catalog function an upstream's tool is governed as: `<schema>.<upstream>__<tool>`."""
    local = re.sub(r"[^A-Za-z0-9_]", "_", upstream_name)
    return f"{settings.schema_name}.{settings.name.replace('-', '_')}__{local}"
