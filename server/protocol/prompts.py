"""The prompts part of the MCP edge: `prompts/list` filtered per identity, `prompts/get` an act (`action=prompt`)."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

from server.errors import InternalError
from server.listing import visible
from server.pipeline import Pipeline
from server.prompts.catalog import PromptCatalog
from server.prompts.target import ROLE
from server.protocol.acts import Acts, caller_of, returnable, source_error, to_mcp_error
from server.registry import ToolOutput


def prompt_result(output: ToolOutput, description: str | None) -> types.GetPromptResult:
    """The prompt's messages as got, or, when an obligation rewrote them (redacted, truncated), one user
    message with the rewritten text."""
    if output.content:
        messages = [
            {"role": block.get(ROLE, "user"), "content": {k: v for k, v in block.items() if k != ROLE}}
            for block in output.content
        ]
    else:
        messages = [{"role": "user", "content": {"type": "text", "text": output.text}}]
    result: dict[str, Any] = {"messages": messages}
    if description is not None:
        result["description"] = description
    return types.GetPromptResult.model_validate(result)


class PromptHandlers:
    """`prompts/list` shows the prompts grants and policy would let the caller get; `prompts/get` runs
    the prompt pipeline: authenticate, resolve, admit, grants (EXECUTE), validate (the arguments
    against the prompt's), policy, record, invoke, obligations, charge, audit."""

    def __init__(self, catalog: PromptCatalog, list_pipeline: Pipeline, get_pipeline: Pipeline, acts: Acts) -> None:
        self._catalog = catalog
        self._list = list_pipeline
        self._get = get_pipeline
        self._acts = acts

    async def list_prompts(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        _, identity, request_id = caller_of(ctx)
        shown = await visible(self._list, list(self._catalog), identity, request_id)
        return types.ListPromptsResult.model_validate({"prompts": [t.definition.as_mcp(t.served_name) for t in shown]})

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult | types.InputRequiredResult:
        call = await self._acts.run_relaying(
            self._get, ctx, params, action="prompt", name=params.name, arguments=dict(params.arguments or {})
        )
        if isinstance(call, types.InputRequiredResult):  # the upstream asks the agent first (2026-07-28)
            return call
        if not returnable(call):
            raise to_mcp_error(call.error or InternalError("prompt", "no result"), name=params.name)
        assert call.output is not None
        if call.output.is_error:
            raise source_error(call.output, name=params.name)
        target = self._catalog.get(params.name)
        return prompt_result(call.output, target.definition.description if target is not None else None)
