"""One resource (or template) as the pipeline governs it: a securable, what reading it needs, how to read it."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.content import as_text, block_parts
from server.registry import ToolOutput
from server.target import Target, slug

__all__ = ["ResourceDefinition", "ResourceTarget", "slug", "template_pattern"]

Reader = Callable[[str], Awaitable[list[dict[str, Any]]]]
"""Reads a URI; returns its contents as MCP resource contents (`uri`, `mimeType`, `text` or `blob`)."""

_EXPRESSION = re.compile(r"\{([+#./;?&]?)([A-Za-z0-9_.,%*]+)\}")


def template_pattern(template: str) -> re.Pattern[str]:
    """A URI template (RFC 6570) as a pattern that matches the URIs it expands to. Simple expressions
    (`{id}`) match one path segment; reserved ones (`{+path}`, `{#frag}`) anything; query forms
    (`{?a,b}`, `{&c}`) an optional query part."""
    out, last = [], 0
    for match in _EXPRESSION.finditer(template):
        out.append(re.escape(template[last : match.start()]))
        operator = match.group(1)
        if operator in ("+", "#"):
            out.append(f"{re.escape(operator) if operator == '#' else ''}.+")
        elif operator in ("?", "&"):
            out.append(r"(?:[?&][^#]*)?")
        elif operator in ("/", "."):
            out.append(rf"(?:{re.escape(operator)}[^/?#]*)*")
        else:
            out.append(r"[^/?#]+")
        last = match.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True, slots=True)
class ResourceDefinition:
    """What the agent is shown for a resource or a template (`uri` is then the URI template)."""

    uri: str
    name: str
    template: bool = False
    title: str | None = None
    description: str | None = None
    mime_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other members the source declared (`size`, `annotations`, `icons`, `_meta`), passed on as they are."""

    def as_mcp(self, name: str) -> dict[str, Any]:
        """The `resources/list` (or `resources/templates/list`) entry, under the name the gateway serves."""
        entry: dict[str, Any] = {**self.extra, ("uriTemplate" if self.template else "uri"): self.uri, "name": name}
        for key, value in (("title", self.title), ("description", self.description), ("mimeType", self.mime_type)):
            if value is not None:
                entry[key] = value
        return entry


class ResourceTarget(Target):
    """A resource or template as a pipeline target: reading needs `READ` on its `RESOURCE` securable;
    its `invoke` reads the URI the call names (`arguments["uri"]`)."""

    def __init__(
        self,
        definition: ResourceDefinition,
        *,
        name: str,
        securable: str,
        reader: Reader,
        upstream: str | None = None,
        privilege: tuple[str, str] = ("READ", "RESOURCE"),
    ) -> None:
        super().__init__(
            name=name,
            securable=securable,
            privilege=privilege,
            upstream=upstream,
            title=definition.title,
            description=definition.description,
        )
        self.definition = definition
        self._reader = reader
        self.pattern = template_pattern(definition.uri) if definition.template else None

    def matches(self, uri: str) -> bool:
        return uri == self.definition.uri if self.pattern is None else self.pattern.fullmatch(uri) is not None

    def decision_input(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """What policy sees of the resource beside `tool` (`input.resource`)."""
        d = self.definition
        return {
            "resource": {
                "uri": str(arguments.get("uri", d.uri)),
                "name": d.name,
                "template": d.uri if d.template else None,
                "mime_type": d.mime_type,
                "upstream": self.spec.upstream,
            }
        }

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        from mcp.shared.exceptions import MCPError

        uri = str(arguments["uri"])
        try:
            contents = await self._reader(uri)
        except MCPError as exc:  # the source answered (an unknown URI under a template): the agent gets its word
            error = {"code": exc.error.code, "message": exc.error.message[:500]}
            return ToolOutput(text=f"{uri}: {error['message']}", is_error=True, structured={"source_error": error})
        blocks = tuple({"type": "resource", "resource": dict(c)} for c in contents)
        return ToolOutput(text=as_text(tuple(block_parts(blocks))), content=blocks)


class SubscribeTarget(Target):
    """A subscription to `resource` as a pipeline target: the same securable and privilege (`READ`),
    what policy sees of it the same (`input.resource`); its `invoke` subscribes (`subscribe`) and
    returns nothing to meter. A resource whose source sends no updates is an error from the source."""

    def __init__(self, resource: ResourceTarget, subscribe: Callable[[], Awaitable[None]], *, watchable: bool) -> None:
        spec = resource.spec
        super().__init__(
            name=spec.name,
            securable=spec.securable,
            privilege=resource._privilege,
            upstream=spec.upstream,
            title=spec.title,
            description=spec.description,
        )
        self.served_name = resource.served_name
        self.resource = resource
        self._subscribe = subscribe
        self._watchable = watchable

    def blocked_reason(self) -> str | None:
        return self.resource.blocked_reason()

    def decision_input(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        return self.resource.decision_input(arguments)

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        uri = str(arguments["uri"])
        if not self._watchable:
            message = f"{uri}: its upstream does not send resource updates"
            error = {"code": -32602, "message": message}
            return ToolOutput(text=message, is_error=True, structured={"source_error": error})
        await self._subscribe()
        return ToolOutput(text="")
