"""An upstream's prompts as the gateway serves them: named with its tool prefix, governed as catalog
functions `<schema>.<upstream>__prompt__<name>`."""

from __future__ import annotations

from typing import Any

from server.completions import upstream_completer
from server.prompts.target import Getter, PromptDefinition, PromptTarget
from server.target import slug
from server.upstream.connection import UpstreamConnection

_SHOWN = ("name", "title", "description", "arguments")


def _dump(item: Any) -> dict[str, Any]:
    if hasattr(item, "model_dump"):
        return dict(item.model_dump(mode="json", by_alias=True, exclude_none=True))
    return dict(item)


def definition_of(item: Any) -> PromptDefinition:
    """What is served (and pinned) of an upstream's prompt: everything its listing says."""
    raw = _dump(item)
    return PromptDefinition(
        name=str(raw.get("name", "")),
        title=raw.get("title"),
        description=raw.get("description"),
        arguments=tuple(dict(a) for a in raw.get("arguments") or ()),
        extra={k: v for k, v in raw.items() if k not in _SHOWN},
    )


def upstream_getter(connection: UpstreamConnection) -> Getter:
    async def get(name: str, arguments: dict[str, str]) -> dict[str, Any]:
        from server.relay.relay import active_relay

        # with the prompt's relay, what the upstream asks while it builds it reaches the agent
        return _dump(await connection.get_prompt(name, arguments, relay=active_relay.get()))

    return get


def upstream_prompt(connection: UpstreamConnection, definition: PromptDefinition) -> PromptTarget:
    import mcp_types as types

    settings = connection.settings
    target = PromptTarget(
        definition,
        name=f"{settings.tool_prefix}{definition.name}",
        securable=f"{settings.schema_name}.{settings.name.replace('-', '_')}__prompt__{slug(definition.name)}",
        getter=upstream_getter(connection),
        upstream=settings.name,
    )
    target.completer = upstream_completer(connection, types.PromptReference(type="ref/prompt", name=definition.name))
    return target
