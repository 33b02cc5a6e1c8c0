"""The resources part of the MCP edge: list, templates, read, subscribe; each read a governed act (`action=read`)."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

from server.errors import InternalError
from server.listing import visible
from server.pipeline import Pipeline
from server.protocol.acts import Acts, caller_of, returnable, source_error, to_mcp_error
from server.resources.catalog import ResourceCatalog
from server.resources.target import ResourceTarget


def read_result(uri: str, call_output: Any) -> types.ReadResourceResult:
    """The contents as read, or, when an obligation rewrote them (redacted, truncated), one text
    content under the URI asked for, saying so."""
    if call_output.content:
        contents = [block["resource"] for block in call_output.content if block.get("type") == "resource"]
    else:
        contents = [{"uri": uri, "mimeType": "text/plain", "text": call_output.text}]
    return types.ReadResourceResult.model_validate({"contents": contents})


class ResourceHandlers:
    """`resources/list` and `resources/templates/list` filtered per identity (a list decision per
    entry: grants and policy would let it be read); `resources/read` through the read pipeline:
    authenticate, resolve, admit, grants (READ), policy, record, invoke, obligations, charge, audit."""

    def __init__(self, catalog: ResourceCatalog, list_pipeline: Pipeline, read_pipeline: Pipeline, acts: Acts) -> None:
        self._catalog = catalog
        self._list = list_pipeline
        self._read = read_pipeline
        self._acts = acts

    async def _visible(
        self, ctx: ServerRequestContext[Any, Any], targets: list[ResourceTarget]
    ) -> list[ResourceTarget]:
        _, identity, request_id = caller_of(ctx)
        return await visible(self._list, targets, identity, request_id, lambda t: {"uri": t.definition.uri})

    async def list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        shown = await self._visible(ctx, self._catalog.resources())
        return types.ListResourcesResult.model_validate(
            {"resources": [t.definition.as_mcp(t.served_name) for t in shown]}
        )

    async def list_resource_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        shown = await self._visible(ctx, self._catalog.templates())
        return types.ListResourceTemplatesResult.model_validate(
            {"resourceTemplates": [t.definition.as_mcp(t.served_name) for t in shown]}
        )

    async def read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        call = await self._acts.run(self._read, ctx, action="read", name=uri, arguments={"uri": uri}, meta=params.meta)
        if not returnable(call):
            raise to_mcp_error(call.error or InternalError("read", "no result"), uri=uri)
        if call.output is not None and call.output.is_error:
            raise source_error(call.output, uri=uri)
        return read_result(uri, call.output)
