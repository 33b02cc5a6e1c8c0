"""List filtering: an identity sees only the tools (resources, prompts) that grants and policy would let it use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from server.call import Call, RunInfo
from server.identity import Identity
from server.pipeline import Pipeline
from server.registry import Tool, ToolRegistry, ToolSpec

T = TypeVar("T", bound=Tool)


async def visible(
    pipeline: Pipeline,
    targets: Sequence[T],
    identity: Identity | None,
    request_id: str = "",
    arguments: Callable[[T], Mapping[str, Any]] | None = None,
) -> list[T]:
    """The `targets` whose list decision (`action=list`, each through `pipeline`: authenticate,
    resolve, grants, policy) allows them. List decisions are not metered or audited one by one:
    nothing runs. `arguments` gives what policy sees of each (a resource: its URI)."""
    run = RunInfo(run_id=f"list-{request_id}")
    calls = await asyncio.gather(
        *(
            pipeline.run(
                Call(
                    tool_name=t.spec.name,
                    arguments=arguments(t) if arguments is not None else {},
                    identity=identity,
                    run=run,
                    action="list",
                    request_id=request_id,
                    tool=t,
                )
            )
            for t in targets
        )
    )
    return [t for t, call in zip(targets, calls, strict=True) if call.allowed]


class ToolLister:
    """Runs each tool through the list pipeline (authenticate, resolve, grants, policy) as `action=list`."""

    def __init__(self, registry: ToolRegistry, pipeline: Pipeline) -> None:
        self._registry = registry
        self._pipeline = pipeline

    def knows(self, name: str) -> bool:
        """A tool of that name is served (whether or not a given caller may see it)."""
        return self._registry.get(name) is not None

    async def visible(self, identity: Identity | None, request_id: str = "") -> list[ToolSpec]:
        tools = list(self._registry)
        calls = await asyncio.gather(
            *(
                self._pipeline.run(
                    Call(
                        tool_name=t.spec.name,
                        arguments={},
                        identity=identity,
                        run=RunInfo(run_id=f"list-{request_id}"),
                        action="list",
                        request_id=request_id,
                    )
                )
                for t in tools
            )
        )
        return [t.spec for t, call in zip(tools, calls, strict=True) if call.allowed]
