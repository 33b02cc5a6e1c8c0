"""One prompt as the pipeline governs it: its arguments as a schema, what getting it needs, how to get it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.content import as_text, block_parts
from server.registry import ToolOutput
from server.target import Target

Getter = Callable[[str, dict[str, str]], Awaitable[dict[str, Any]]]
"""Gets a prompt by its source's name with arguments; returns the `GetPromptResult` as a dict."""

ROLE = "_castellan_role"
"""Where a message's role rides on its content block through the pipeline (stripped at the edge)."""


@dataclass(frozen=True, slots=True)
class PromptDefinition:
    """What the agent is shown for a prompt: its source's name, and its arguments (name, required)."""

    name: str
    title: str | None = None
    description: str | None = None
    arguments: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other members the source declared (`icons`, `_meta`), passed on as they are."""

    def as_mcp(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {**self.extra, "name": name, "arguments": [dict(a) for a in self.arguments]}
        for key, value in (("title", self.title), ("description", self.description)):
            if value is not None:
                entry[key] = value
        return entry

    def input_schema(self) -> dict[str, Any]:
        """Prompt arguments are strings (MCP): the declared ones, those marked required required, no others."""
        names = [str(a.get("name", "")) for a in self.arguments]
        return {
            "type": "object",
            "properties": {n: {"type": "string"} for n in names},
            "required": [str(a["name"]) for a in self.arguments if a.get("required")],
            "additionalProperties": False,
        }


class PromptTarget(Target):
    """A prompt as a pipeline target: getting it needs `EXECUTE` on its function securable (a prompt
    is a template run with arguments, as a catalog function is); its arguments are validated against
    `PromptDefinition.input_schema` and decided like a tool call's (`input.arguments`, `input.normalized`)."""

    def __init__(
        self, definition: PromptDefinition, *, name: str, securable: str, getter: Getter, upstream: str | None
    ) -> None:
        super().__init__(
            name=name,
            securable=securable,
            privilege=("EXECUTE", "FUNCTION"),
            upstream=upstream,
            title=definition.title,
            description=definition.description,
            input_schema=definition.input_schema(),
        )
        self.definition = definition
        self._getter = getter

    def decision_input(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        arguments_declared = [
            {"name": str(a.get("name", "")), "required": bool(a.get("required"))} for a in self.definition.arguments
        ]
        return {
            "prompt": {"name": self.definition.name, "upstream": self.spec.upstream, "arguments": arguments_declared}
        }

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        from mcp.shared.exceptions import MCPError

        try:
            result = await self._getter(self.definition.name, {k: str(v) for k, v in arguments.items()})
        except MCPError as exc:
            message = exc.error.message[:500]
            error = {"code": exc.error.code, "message": message}
            return ToolOutput(text=message, is_error=True, structured={"source_error": error})
        blocks = tuple(
            {**dict(m.get("content") or {}), ROLE: str(m.get("role", "user"))} for m in result.get("messages", [])
        )
        return ToolOutput(text=as_text(tuple(block_parts(blocks))), content=blocks)
