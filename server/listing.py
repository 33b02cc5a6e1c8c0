"""`tools/list` filtering: an identity sees only the tools that grants and policy would let it call."""

from __future__ import annotations

import asyncio

from server.call import Call, RunInfo
from server.identity import Identity
from server.pipeline import Pipeline
from server.registry import ToolRegistry, ToolSpec


class ToolLister:
    """Runs each tool through the list pipeline (authenticate, resolve, grants, policy) as `action=list`.

    List decisions are not metered or audited one by one: they run no tool.
    """

    def __init__(self, registry: ToolRegistry, pipeline: Pipeline) -> None:
        self._registry = registry
        self._pipeline = pipeline

    def knows(self, name: str) -> bool:
        """A tool of that name is served (whether or not a given caller may see it)."""
        return self._registry.get(name) is not None

    async def visible(self, identity: Identity | None, request_id: str = "") -> list[ToolSpec]:
        tools = list(self._registry)
        run = RunInfo(run_id=f"list-{request_id}")
        calls = await asyncio.gather(
            *(
                self._pipeline.run(
                    Call(
                        tool_name=t.spec.name,
                        arguments={},
                        identity=identity,
                        run=run,
                        action="list",
                        request_id=request_id,
                    )
                )
                for t in tools
            )
        )
        return [t.spec for t, call in zip(tools, calls, strict=True) if call.allowed]
