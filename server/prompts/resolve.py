"""Pipeline stage for prompts: resolve the name a `prompts/get` asks for to the prompt that serves it."""

from __future__ import annotations

from dataclasses import replace

from server.call import Call
from server.errors import Denied, NotFound
from server.prompts.catalog import PromptCatalog


class ResolvePromptStage:
    """The prompt from the catalog (or the one a list entry carries already). An unknown name is
    `NotFound` and a blocked prompt (its definition quarantined) a denial, both audited."""

    name = "resolve"

    def __init__(self, catalog: PromptCatalog) -> None:
        self._catalog = catalog

    async def run(self, call: Call) -> Call:
        target = call.tool if call.tool is not None else self._catalog.get(call.tool_name)
        if target is None:
            raise NotFound(self.name, f"unknown prompt {call.tool_name[:256]!r}")
        blocked = getattr(target, "blocked_reason", None)
        reason = blocked() if blocked is not None else None
        if reason:
            raise Denied(self.name, str(reason))
        return replace(call, tool=target)
