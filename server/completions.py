"""Completions (`completion/complete`): suggestions for a prompt's or a resource template's argument,
governed as an act on that prompt or template (`action=complete`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from server.call import Call
from server.errors import Denied, NotFound
from server.grants.source import Requirement
from server.registry import ToolOutput
from server.target import Completer, Target
from server.upstream.connection import UpstreamConnection


def upstream_completer(connection: UpstreamConnection, ref: Any) -> Completer:
    """Completes through the upstream, when it declared `completions` (else there is nothing to ask)."""

    async def complete(argument: str, value: str, context: dict[str, str]) -> dict[str, Any]:
        if not connection.serves("completions"):
            return {"values": []}
        result = await connection.complete(ref, {"name": argument, "value": value}, context or None)
        return dict(result.completion.model_dump(mode="json", by_alias=True, exclude_none=True))

    return complete


class CompletionTarget:
    """A completion of one argument of `target` (a prompt or a resource template): it needs what using
    the target needs (its grants, its block), and policy sees the target plus `input.completion`; its
    `arguments` are the context's with the argument being typed, so the argument rules apply to the
    text as it is typed."""

    def __init__(self, target: Target, ref: Mapping[str, str], argument: str) -> None:
        self.target = target
        self.spec = target.spec
        self._ref = dict(ref)
        self._argument = argument
        self._completer: Completer | None = target.completer

    def requirements(self) -> tuple[Requirement, ...]:
        return self.target.requirements()

    def blocked_reason(self) -> str | None:
        return self.target.blocked_reason()

    def decision_input(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        own = getattr(self.target, "decision_input", None)
        target_input: dict[str, Any] = own(arguments) if own is not None else {}
        context = {k: str(v) for k, v in arguments.items() if k != self._argument}
        completion: dict[str, Any] = {
            "ref": self._ref,
            "argument": {"name": self._argument, "value": str(arguments.get(self._argument, ""))},
        }
        if context:
            completion["context"] = context
        return {**target_input, "completion": completion}

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        if self._completer is None:  # the source completes nothing: no suggestions, not an error
            completion: dict[str, Any] = {"values": []}
        else:
            from mcp.shared.exceptions import MCPError

            context = {k: str(v) for k, v in arguments.items() if k != self._argument}
            try:
                completion = await self._completer(self._argument, str(arguments.get(self._argument, "")), context)
            except MCPError as exc:  # the source refused (an unknown argument): the agent gets its word
                message = exc.error.message[:500]
                error = {"code": exc.error.code, "message": message}
                return ToolOutput(text=message, is_error=True, structured={"source_error": error})
        completion["values"] = [str(v) for v in completion.get("values", [])][:100]  # MCP: at most 100
        return ToolOutput(text=json.dumps(completion), structured={"completion": completion})


class ResolveCompletionStage:
    """The completion's target is found by the edge (it knows the reference); this stage refuses a
    reference to nothing (`NotFound`) and a blocked target, both audited like any other act."""

    name = "resolve"

    async def run(self, call: Call) -> Call:
        if call.tool is None:
            raise NotFound(self.name, f"unknown completion reference {call.tool_name[:256]!r}")
        blocked = getattr(call.tool, "blocked_reason", None)
        reason = blocked() if blocked is not None else None
        if reason:
            raise Denied(self.name, str(reason))
        return replace(call, tool=call.tool)
