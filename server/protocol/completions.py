"""The completions part of the MCP edge: `completion/complete`, an act on the prompt or template it completes."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

from server.completions import CompletionTarget
from server.errors import InternalError
from server.pipeline import Pipeline
from server.prompts.catalog import PromptCatalog
from server.protocol.acts import Acts, returnable, source_error, to_mcp_error
from server.resources.catalog import ResourceCatalog
from server.target import Target


class CompletionHandlers:
    """Finds what the reference names (a prompt by its served name, a template by its URI template),
    then runs the completion pipeline: authenticate, resolve, admit, grants (what using the target
    needs), policy (`input.completion`), record, invoke, obligations, charge, audit."""

    def __init__(self, prompts: PromptCatalog, resources: ResourceCatalog, pipeline: Pipeline, acts: Acts) -> None:
        self._prompts = prompts
        self._resources = resources
        self._pipeline = pipeline
        self._acts = acts

    def _target(self, ref: Any) -> tuple[Target | None, dict[str, str], str]:
        if isinstance(ref, types.PromptReference):
            return self._prompts.get(ref.name), {"type": "ref/prompt", "name": ref.name}, f"ref/prompt:{ref.name}"
        uri = str(getattr(ref, "uri", ""))
        found = next((t for t in self._resources.templates() if t.definition.uri == uri), None)
        return found, {"type": "ref/resource", "uri": uri}, f"ref/resource:{uri}"

    async def complete(
        self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        target, ref, name = self._target(params.ref)
        argument = params.argument.name
        context = dict(params.context.arguments or {}) if params.context is not None else {}
        arguments = {**context, argument: params.argument.value}
        preset = CompletionTarget(target, ref, argument) if target is not None else None
        call = await self._acts.run(
            self._pipeline, ctx, action="complete", name=name, arguments=arguments, meta=params.meta, tool=preset
        )
        if not returnable(call):
            raise to_mcp_error(call.error or InternalError("complete", "no result"), ref=ref)
        assert call.output is not None
        if call.output.is_error:
            raise source_error(call.output, ref=ref)
        completion = (call.output.structured or {}).get("completion") or {"values": []}
        return types.CompleteResult.model_validate({"completion": completion})
