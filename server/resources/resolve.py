"""Pipeline stage for resources: resolve the URI a read names to the resource or template that serves it."""

from __future__ import annotations

from dataclasses import replace

from server.call import Call
from server.errors import Denied, NotFound
from server.resources.catalog import ResourceCatalog


class ResolveResourceStage:
    """The read's target from the catalog (or the one a list entry carries already). An unknown URI
    is `NotFound` and a blocked resource (its definition quarantined) a denial, both audited."""

    name = "resolve"

    def __init__(self, catalog: ResourceCatalog) -> None:
        self._catalog = catalog

    async def run(self, call: Call) -> Call:
        target = call.tool if call.tool is not None else self._catalog.find(str(call.arguments.get("uri", "")))
        if target is None:
            raise NotFound(self.name, f"unknown resource {call.tool_name[:256]!r}")
        blocked = getattr(target, "blocked_reason", None)
        reason = blocked() if blocked is not None else None
        if reason:
            raise Denied(self.name, str(reason))
        return replace(call, tool=target)
