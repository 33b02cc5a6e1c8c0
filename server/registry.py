"""The tool registry: what a tool declares (name, schemas, securable) and how to find one by name."""

from __future__ import annotations

import contextlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.errors import ConfigError
from server.tool_schema import ArgumentsValidator, SchemaRefused, compile_arguments, compiled

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
    task_support: str = "forbidden"
    """Whether a call may run as a task (`optional`, `required`; server/protocol/tasks.py)."""

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
    sent as they are. Every kind of content is metered, capped, audited and scanned (`server.content`);
    anything that rewrites the result (an obligation, a truncation) drops these blocks and sends the
    rewritten text."""
    returned: Mapping[str, Any] | None = None
    """When the result was rewritten: what the tool had returned, summarised (kinds, sizes, hashes),
    for the audit record."""


class Tool(Protocol):
    """A callable tool. `invoke` gets arguments already validated against `spec.input_schema`
    (compiled by `server.tool_schema` when the tool is registered).

    It may raise any exception: the invoke stage turns it into an `isError` result.
    """

    @property
    def spec(self) -> ToolSpec: ...

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput: ...


class ToolRegistry:
    """The tools the gateway serves, by name, each with its compiled arguments validator.

    Names are unique, and so are securables: two tools whose names differ only in case, separators
    (`.`, `_`, `-`) or look-alike characters, or that map to one securable (compared without case, as
    Unity Catalog does), are a collision. Among built-in tools a collision or a schema that cannot be
    served safely is a `ConfigError`; an upstream's colliding tool is refused (`collision` says why,
    naming both sides) and the tool registered first keeps serving.
    """

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, ArgumentsValidator] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        """Registers a built-in tool. Raises `ConfigError` for a collision or a refused input schema."""
        clash = self.collision(tool.spec)
        if clash:
            raise ConfigError(clash)
        try:
            validator = compile_arguments(tool.spec.input_schema)
        except SchemaRefused as exc:
            raise ConfigError(f"tool {tool.spec.name!r}: input schema refused: {exc.reason}") from None
        self._tools[tool.spec.name] = tool
        self._validators[tool.spec.name] = validator

    def collision(self, spec: ToolSpec, also: Iterable[ToolSpec] = ()) -> str | None:
        """Why `spec` cannot be registered beside the tools already here (other than its own
        upstream's, which it replaces) and `also`, or None."""
        others = [t.spec for t in self._tools.values() if spec.upstream is None or t.spec.upstream != spec.upstream]
        for other in [*others, *also]:
            why = _clash(spec, other)
            if why:
                return (
                    f"{_side(spec)} {spec.name!r} (securable {spec.securable}) collides with {_side(other)} "
                    f"{other.name!r} (securable {other.securable}): {why}; {other.name!r} keeps serving"
                )
        return None

    def sync(self, upstream: str, tools: Iterable[Tool]) -> None:
        """Makes `tools` the tools of `upstream` (the tools it no longer offers are removed). A tool
        must not collide (check with `collision` first: a collision here raises `ConfigError`); one
        whose schema is refused is registered without a validator, and must be blocked."""
        batch: list[Tool] = []
        for tool in tools:
            clash = self.collision(tool.spec, [t.spec for t in batch])
            if clash:
                raise ConfigError(clash)
            batch.append(tool)
        for name in [n for n, t in self._tools.items() if t.spec.upstream == upstream]:
            del self._tools[name]
            self._validators.pop(name, None)
        for tool in batch:
            self._tools[tool.spec.name] = tool
            with contextlib.suppress(SchemaRefused):  # served blocked (the manager refused it)
                self._validators[tool.spec.name] = compiled(tool.spec.input_schema)

    def validator(self, tool: Tool) -> ArgumentsValidator:
        """The compiled validator of `tool`'s input schema. Raises `SchemaRefused`."""
        validator = self._validators.get(tool.spec.name)
        if validator is not None and self._tools.get(tool.spec.name) is tool:
            return validator
        return compiled(tool.spec.input_schema)  # replaced since the call resolved it

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)


def _side(spec: ToolSpec) -> str:
    return f"upstream {spec.upstream} tool" if spec.upstream else "built-in tool"


# ASCII characters that read as others (Unicode's confusables for the characters a tool name may hold).
_LOOK_ALIKE = (("rn", "m"), ("vv", "w"), ("0", "O"), ("1", "l"), ("I", "l"), ("|", "l"))


def name_keys(name: str) -> tuple[str, str]:
    """Two forms of a tool name that collide for look-alikes: case-folded (NFKC, default-ignorable
    characters dropped, `.`/`_`/`-` as one), and that of its look-alike skeleton."""
    text = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) not in ("Cf", "Mn", "Cc"))
    skeleton = text
    for seen, means in _LOOK_ALIKE:
        skeleton = skeleton.replace(seen, means)
    return tuple(re.sub(r"[._\-]+", ".", form.casefold()) for form in (text, skeleton))  # type: ignore[return-value]


def _clash(spec: ToolSpec, other: ToolSpec) -> str | None:
    why = []
    if spec.name == other.name:
        why.append("the same name")
    elif any(a == b for a, b in zip(name_keys(spec.name), name_keys(other.name), strict=True)):
        why.append("names that differ only in case, separators or look-alike characters")
    if spec.securable.casefold() == other.securable.casefold():
        why.append("the same securable")
    return " and ".join(why) or None
