"""The tool registry: what a tool declares (name, schemas, securable) and how to find one by name."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.errors import ConfigError

# MCP tool names (spec 2025-11-25): 1-128 chars of letters, digits, '_', '-', '.'.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
# A Unity Catalog three-level name: catalog.schema.object.
_SECURABLE = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What a tool declares. `securable` is the catalog function it maps to (`main.tools.echo`)."""

    name: str
    description: str
    securable: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any] | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)
    title: str | None = None
    upstream: str | None = None

    def __post_init__(self) -> None:
        if not _TOOL_NAME.match(self.name):
            raise ConfigError(f"tool name {self.name!r} is not a valid MCP tool name")
        if not _SECURABLE.match(self.securable):
            raise ConfigError(f"tool {self.name!r}: securable {self.securable!r} is not catalog.schema.name")

    def as_input(self) -> dict[str, Any]:
        """The `tool` part of the policy decision input."""
        return {
            "name": self.name,
            "securable": self.securable,
            "annotations": dict(self.annotations),
            "upstream": self.upstream,
        }


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """A tool's result before it becomes an MCP `CallToolResult`."""

    text: str
    structured: Mapping[str, Any] | None = None
    is_error: bool = False
    content: tuple[Mapping[str, Any], ...] = ()
    """MCP content blocks (images, audio, embedded resources…) from a tool that returns more than text,
    sent as they are. `text` is still what is metered, audited and decided on; anything that rewrites
    the result (an obligation, a truncation) drops these blocks and sends the rewritten text."""


class Tool(Protocol):
    """A callable tool. `invoke` gets arguments already validated against `spec.input_schema`.

    It may raise any exception: the invoke stage turns it into an `isError` result.
    """

    @property
    def spec(self) -> ToolSpec: ...

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput: ...


class ToolRegistry:
    """The tools the gateway serves, by name. Names are unique."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        name = tool.spec.name
        if name in self._tools:
            raise ConfigError(f"two tools are named {name!r}")
        self._tools[name] = tool

    def put(self, tool: Tool) -> None:
        """Adds or replaces (upstream tools are re-read while the gateway runs)."""
        self._tools[tool.spec.name] = tool

    def remove(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)
