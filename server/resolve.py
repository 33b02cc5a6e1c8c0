"""Pipeline stage: resolve the requested tool by name (unknown and quarantined tools stop here)."""

from __future__ import annotations

from server.call import Call
from server.errors import Denied
from server.registry import ToolRegistry


class ResolveStage:
    """Finds the tool, before anything is metered or decided. An unknown name is a denial (audited
    like any other), not a protocol error; so is a blocked tool (an upstream tool whose definition is
    quarantined or refused). The arguments are checked later (`server.validate`), after the cheap
    refusals: an identity without grants on a tool never costs a validation of its arguments."""

    name = "resolve"

    def __init__(self, registry: ToolRegistry) -> None:
        self._registry = registry

    async def run(self, call: Call) -> Call:
        tool = self._registry.get(call.tool_name)
        if tool is None:
            raise Denied(self.name, f"unknown tool {call.tool_name[:128]!r}")
        blocked = getattr(tool, "blocked_reason", None)  # a quarantined upstream tool: hidden and denied
        reason = blocked() if blocked is not None else None
        if reason:
            raise Denied(self.name, str(reason))
        return call.evolve(tool=tool)
