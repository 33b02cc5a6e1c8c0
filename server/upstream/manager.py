"""Keeps the registry's upstream tools in step with the upstream servers and their pins."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from server.prompts.catalog import PromptCatalog
from server.prompts.target import PromptDefinition, PromptTarget
from server.prompts.upstream import definition_of as prompt_definition
from server.prompts.upstream import upstream_prompt
from server.registry import Tool, ToolRegistry
from server.resources.catalog import ResourceCatalog
from server.resources.subscriptions import ResourceSubscriptions
from server.resources.target import ResourceDefinition, ResourceTarget
from server.resources.upstream import definition_of as resource_definition
from server.resources.upstream import upstream_target
from server.settings import UpstreamSettings
from server.target import Target
from server.target_catalog import TargetCatalog
from server.tool_schema import SchemaRefused, compile_arguments
from server.upstream.connection import UpstreamConnection
from server.upstream.pins import PinStore, Refusal
from server.upstream.tool import UpstreamTool, definition_of

log = structlog.get_logger("castellan.upstream")

_T = TypeVar("_T", bound=Target)


@dataclass(frozen=True)
class _Entry(Generic[_T]):
    """One prompt or resource an upstream listed: how it is named in logs, how its target is built
    (raising when the gateway cannot serve it), and what it is pinned as once built (key, what, pinned)."""

    label: dict[str, str]
    build: Callable[[], _T]
    pin: Callable[[_T], tuple[str, str, dict[str, Any]]]


def _prompt_pin(definition: PromptDefinition, target: PromptTarget) -> tuple[str, str, dict[str, Any]]:
    return (
        f"prompt:{target.served_name}",
        f"prompt {target.served_name}",
        {"kind": "prompt", **definition.as_mcp(definition.name)},
    )


def _resource_pin(
    definition: ResourceDefinition, template: bool, _target: ResourceTarget
) -> tuple[str, str, dict[str, Any]]:
    kind = "resource_template" if template else "resource"
    what = f"{'resource template' if template else 'resource'} {definition.uri}"
    return f"resource:{definition.uri}", what, {"kind": kind, **definition.as_mcp(definition.name)}


class UpstreamManager:
    def __init__(
        self,
        upstreams: list[UpstreamSettings],
        registry: ToolRegistry,
        pins: PinStore,
        refresh_seconds: float,
        on_new_tool: Callable[[Tool], None] | None = None,
        resources: ResourceCatalog | None = None,
        on_new_resource: Callable[[ResourceTarget], None] | None = None,
        prompts: PromptCatalog | None = None,
        on_new_prompt: Callable[[PromptTarget], None] | None = None,
    ) -> None:
        self.prompts = prompts
        self.on_lists_changed: Callable[[list[str]], Awaitable[None]] | None = None
        self._on_new_prompt = on_new_prompt
        self._known_prompts: set[str] = set()
        self._on_new_tool = on_new_tool
        self.resources = resources
        self._on_new_resource = on_new_resource
        self._known_resources: set[str] = set()
        self.connections = [UpstreamConnection(u) for u in upstreams]
        self._registry = registry
        self.pins = pins
        self._refresh_seconds = refresh_seconds
        self._task: asyncio.Task[None] | None = None

    def watch_resources(self, subscriptions: ResourceSubscriptions) -> None:
        """Each upstream's resource updates reach `subscriptions`, which tells it what to watch."""
        for connection in self.connections:
            connection.on_resource_updated = functools.partial(subscriptions.updated, connection.name)
            subscriptions.source(connection.name, connection.watch_resources, connection.sends_resource_updates)

    def serves(self, capability: str) -> bool:
        """Some upstream declared `capability` (`completions`, ...) when it connected."""
        return any(c.serves(capability) for c in self.connections)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="castellan-upstreams")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            await self.refresh()

    def _served(self) -> dict[str, list[tuple[object, ...]]]:
        """What agents are shown, by kind: a change in it is a list change (`on_lists_changed`)."""

        def blocked(tool: object) -> str | None:
            why = getattr(tool, "blocked_reason", None)
            return why() if why is not None else None

        return {
            "tools": sorted((t.spec.name, t.spec.description, str(blocked(t))) for t in self._registry),
            "resources": sorted(
                (t.definition.uri, t.served_name, t.definition.description or "", str(t.blocked))
                for t in (self.resources or ())
            ),
            "prompts": sorted(
                (t.served_name, t.definition.description or "", str(t.blocked)) for t in (self.prompts or ())
            ),
        }

    async def refresh(self) -> None:
        """Re-lists every upstream; records definitions with the pin store; updates the registry and the
        catalogs; tells `on_lists_changed` which lists agents are shown changed (tools an upstream added
        or dropped, a definition quarantined or approved)."""
        before = self._served()
        await self._refresh_all()
        after = self._served()
        changed = [kind for kind in after if after[kind] != before[kind]]
        if changed and self.on_lists_changed is not None:
            try:
                await self.on_lists_changed(changed)
            except Exception:
                log.exception("list_changed_failed")

    async def _refresh_all(self) -> None:
        for connection in self.connections:
            try:
                listed = await connection.list_tools()
            except Exception as exc:
                log.warning("upstream_list_failed", upstream=connection.name, error=str(exc)[:300])
                continue
            self._serve(connection, listed)
            if self.resources is not None:
                await self._refresh_resources(connection, self.resources)
                try:
                    await connection.keep_watching()  # a reconnected upstream forgot its subscriptions
                except Exception as exc:
                    log.warning("upstream_watch_failed", upstream=connection.name, error=str(exc)[:300])
            if self.prompts is not None:
                await self._refresh_prompts(connection, self.prompts)

    def _quarantine_reason(
        self, connection: UpstreamConnection, key: str, what: str, pinned: dict[str, Any]
    ) -> str | None:
        """Pins `pinned` under `key` (like a tool's definition): why it is blocked, or None when approved."""
        status = self.pins.observe(key, connection.name, pinned, trust_first=connection.settings.pin == "first-use")
        if status == "approved":
            return None
        return (
            f"upstream {what} is quarantined: its definition changed (or was never approved); "
            f"an admin must review and approve it (castellan tools approve {key})"
        )

    async def _refresh_prompts(self, connection: UpstreamConnection, catalog: PromptCatalog) -> None:
        """Serves the prompts `connection` lists now (none without the prompts capability), each pinned
        under `prompt:<name served>`; a name another upstream serves is refused (the first keeps it)."""
        entries: list[_Entry[PromptTarget]] = []
        if connection.serves("prompts"):
            try:
                prompts = await connection.list_prompts()
            except Exception as exc:
                log.warning("upstream_prompts_list_failed", upstream=connection.name, error=str(exc)[:300])
                return
            for item in prompts:
                definition = prompt_definition(item)
                entries.append(
                    _Entry(
                        {"prompt": definition.name[:200]},
                        functools.partial(upstream_prompt, connection, definition),
                        functools.partial(_prompt_pin, definition),
                    )
                )
        self._sync(connection, catalog, "upstream_prompt_refused", entries, self._on_new_prompt, self._known_prompts)

    async def _refresh_resources(self, connection: UpstreamConnection, catalog: ResourceCatalog) -> None:
        """Serves the resources and templates `connection` lists now (none if it declares no resources
        capability). Each definition is pinned like a tool's, under `resource:<uri>`: a changed name,
        description or MIME type is quarantined (listed nowhere, reads denied) until approved. A URI or
        template another upstream already serves is refused, and the first keeps serving."""
        entries: list[_Entry[ResourceTarget]] = []
        if connection.serves("resources"):
            try:
                resources = await connection.list_resources()
                templates = await connection.list_resource_templates()
            except Exception as exc:
                log.warning("upstream_resources_list_failed", upstream=connection.name, error=str(exc)[:300])
                return
            for item, template in [*((r, False) for r in resources), *((t, True) for t in templates)]:
                definition = resource_definition(item, template)
                entries.append(
                    _Entry(
                        {"uri": definition.uri[:300]},
                        functools.partial(upstream_target, connection, definition),
                        functools.partial(_resource_pin, definition, template),
                    )
                )
        self._sync(
            connection, catalog, "upstream_resource_refused", entries, self._on_new_resource, self._known_resources
        )

    def _sync(
        self,
        connection: UpstreamConnection,
        catalog: TargetCatalog[_T],
        refused: str,
        entries: list[_Entry[_T]],
        on_new: Callable[[_T], None] | None,
        known: set[str],
    ) -> None:
        """Serves `entries` from `connection` in `catalog` (prompts or resources): one whose target cannot
        be built (a name or securable we cannot serve) or that another upstream already serves is
        refused and logged as `refused`; the rest are pinned, blocked unless approved, and new ones are
        announced to `on_new` once (e.g. to create their securable in the local catalog)."""
        listed: list[_T] = []
        for entry in entries:
            try:
                target = entry.build()
            except Exception as exc:
                log.warning(refused, upstream=connection.name, **entry.label, reason=str(exc)[:300])
                continue
            clash = catalog.collision(connection.name, target, listed)
            if clash:
                log.warning(refused, upstream=connection.name, **entry.label, reason=clash)
                continue
            target.blocked = self._quarantine_reason(connection, *entry.pin(target))
            if on_new is not None and target.spec.securable not in known:
                on_new(target)
                known.add(target.spec.securable)
            listed.append(target)
        catalog.sync(connection.name, listed)

    def _serve(self, connection: UpstreamConnection, listed: list[Any]) -> None:
        """Serves what `connection` lists now. Refused, each with its reason (logged once, recorded for
        `castellan tools list`): a tool whose name or securable collides with a built-in tool or one
        registered earlier (which keeps serving), and one the gateway cannot name. A tool whose input
        schema cannot be validated safely is served blocked. Collisions are checked before the pin is
        touched, so a colliding definition never becomes the one pinned under that name."""
        batch: list[UpstreamTool] = []
        refusals: list[Refusal] = []
        for upstream_tool in listed:
            definition = definition_of(upstream_tool)
            name = f"{connection.settings.tool_prefix}{upstream_tool.name}"
            try:
                tool = UpstreamTool(connection, definition)
            except Exception as exc:  # a name or securable we cannot serve
                refusals.append(
                    Refusal(name, connection.name, str(upstream_tool.name), "name", str(exc)[:300], definition)
                )
                continue
            clash = self._registry.collision(tool.spec, [t.spec for t in batch])
            if clash:
                refusals.append(
                    Refusal(tool.spec.name, connection.name, tool.upstream_name, "collision", clash, definition)
                )
                continue
            try:
                which = "input"
                compile_arguments(tool.spec.input_schema)
                which = "output"
                if tool.spec.output_schema is not None:  # results are validated against it (connection)
                    compile_arguments(tool.spec.output_schema)
            except SchemaRefused as exc:
                tool.refused = f"its {which} schema cannot be validated safely: {exc.reason}"
                refusals.append(
                    Refusal(tool.spec.name, connection.name, tool.upstream_name, "schema", tool.refused, definition)
                )
            else:
                tool.status = self.pins.observe(
                    tool.spec.name, connection.name, definition, trust_first=connection.settings.pin == "first-use"
                )
            previous = self._registry.get(tool.spec.name)
            if tool.status == "quarantined" and not tool.refused and getattr(previous, "status", "") != "quarantined":
                log.warning("upstream_tool_quarantined", tool=tool.spec.name, upstream=connection.name)
            if previous is None and self._on_new_tool is not None:
                self._on_new_tool(tool)  # e.g. create its function in the local catalog
            batch.append(tool)
        self._registry.sync(connection.name, batch)
        connection.output_schemas = {
            t.upstream_name: t.spec.output_schema for t in batch if t.spec.output_schema is not None and not t.refused
        }
        for refusal in self.pins.record_refusals(connection.name, refusals):
            log.warning(
                "upstream_tool_refused",
                tool=refusal.tool,
                upstream=connection.name,
                kind=refusal.kind,
                reason=refusal.reason,
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for connection in self.connections:
            await connection.close()
        self.pins.close()
