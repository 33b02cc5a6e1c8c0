"""Keeps the registry's upstream tools in step with the upstream servers and their pins."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from server.registry import Tool, ToolRegistry
from server.settings import UpstreamSettings
from server.upstream.connection import UpstreamConnection
from server.upstream.pins import PinStore
from server.upstream.tool import UpstreamTool, definition_of

log = structlog.get_logger("castellan.upstream")


class UpstreamManager:
    def __init__(
        self,
        upstreams: list[UpstreamSettings],
        registry: ToolRegistry,
        pins: PinStore,
        refresh_seconds: float,
        on_new_tool: Callable[[Tool], None] | None = None,
    ) -> None:
        self._on_new_tool = on_new_tool
        self.connections = [UpstreamConnection(u) for u in upstreams]
        self._registry = registry
        self.pins = pins
        self._refresh_seconds = refresh_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="castellan-upstreams")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            await self.refresh()

    async def refresh(self) -> None:
        """Re-lists every upstream; records definitions with the pin store; updates the registry."""
        for connection in self.connections:
            try:
                listed = await connection.list_tools()
            except Exception as exc:
                log.warning("upstream_list_failed", upstream=connection.name, error=str(exc)[:300])
                continue
            served: set[str] = set()
            for upstream_tool in listed:
                definition = definition_of(upstream_tool)
                status = self.pins.observe(
                    f"{connection.settings.tool_prefix}{upstream_tool.name}",
                    connection.name,
                    definition,
                    trust_first=connection.settings.pin == "first-use",
                )
                try:
                    tool = UpstreamTool(connection, definition, status)
                except Exception as exc:  # a name or schema we cannot serve
                    log.warning("upstream_tool_skipped", upstream=connection.name, tool=upstream_tool.name,
                                error=str(exc)[:200])  # fmt: skip
                    continue
                previous = self._registry.get(tool.spec.name)
                if status == "quarantined" and (previous is None or getattr(previous, "status", "") != status):
                    log.warning("upstream_tool_quarantined", tool=tool.spec.name, upstream=connection.name)
                if previous is None and self._on_new_tool is not None:
                    self._on_new_tool(tool)  # e.g. create its function in the local catalog
                self._registry.put(tool)
                served.add(tool.spec.name)
            for stale in [t for t in self._registry if t.spec.upstream == connection.name]:
                if stale.spec.name not in served:
                    self._registry.remove(stale.spec.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for connection in self.connections:
            await connection.close()
        self.pins.close()
