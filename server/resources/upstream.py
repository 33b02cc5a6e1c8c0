"""An upstream's resources and templates as the gateway serves them: named with its tool prefix,
governed as `RESOURCE` securables `<schema>.<upstream>__resource__<uri>`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.resources.target import ResourceDefinition, ResourceTarget, slug
from server.settings import UpstreamSettings
from server.upstream.connection import UpstreamConnection

_SHOWN = ("uri", "uriTemplate", "name", "title", "description", "mimeType")


def _dump(item: Any) -> dict[str, Any]:
    if hasattr(item, "model_dump"):
        return dict(item.model_dump(mode="json", by_alias=True, exclude_none=True))
    return dict(item)


def definition_of(item: Any, template: bool) -> ResourceDefinition:
    """What is served (and pinned) of an upstream's resource or template: everything its listing says."""
    raw = _dump(item)
    return ResourceDefinition(
        uri=str(raw.get("uriTemplate" if template else "uri", "")),
        name=str(raw.get("name", "")),
        template=template,
        title=raw.get("title"),
        description=raw.get("description"),
        mime_type=raw.get("mimeType"),
        extra={k: v for k, v in raw.items() if k not in _SHOWN},
    )


def resource_securable(settings: UpstreamSettings, uri: str) -> str:
    return f"{settings.schema_name}.{settings.name.replace('-', '_')}__resource__{slug(uri)}"


def upstream_reader(connection: UpstreamConnection) -> Callable[[str], Any]:
    async def read(uri: str) -> list[dict[str, Any]]:
        from server.relay.relay import active_relay

        # with the read's relay, what the upstream asks while it reads reaches the agent (input rounds)
        result = await connection.read_resource(uri, relay=active_relay.get())
        return [_dump(c) for c in result.contents]

    return read


def upstream_target(connection: UpstreamConnection, definition: ResourceDefinition) -> ResourceTarget:
    import mcp_types as types

    from server.completions import upstream_completer

    settings = connection.settings
    target = ResourceTarget(
        definition,
        name=f"{settings.tool_prefix}{definition.name or slug(definition.uri)}",
        securable=resource_securable(settings, definition.uri),
        reader=upstream_reader(connection),
        upstream=settings.name,
    )
    if definition.template:
        ref = types.ResourceTemplateReference(type="ref/resource", uri=definition.uri)
        target.completer = upstream_completer(connection, ref)
    return target
