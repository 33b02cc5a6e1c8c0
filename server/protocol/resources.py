"""The resources part of the MCP edge: list, templates, read, subscribe; each read a governed act (`action=read`),
each subscription one too (`action=subscribe`)."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

from server.errors import InternalError
from server.listing import visible
from server.pipeline import Pipeline
from server.protocol.acts import Acts, caller_of, returnable, source_error, to_mcp_error
from server.protocol.logging import connection_of
from server.resources.catalog import ResourceCatalog
from server.resources.subscriptions import ResourceSubscriptions
from server.resources.target import ResourceTarget, SubscribeTarget

MAX_LISTENED = 100
"""At most this many resource subscriptions on one listen stream are decided and honored."""


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

    def __init__(
        self,
        catalog: ResourceCatalog,
        list_pipeline: Pipeline,
        read_pipeline: Pipeline,
        acts: Acts,
        subscriptions: ResourceSubscriptions | None = None,
    ) -> None:
        self._catalog = catalog
        self._list = list_pipeline
        self._read = read_pipeline
        self._acts = acts
        self.subscriptions = subscriptions

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
    ) -> types.ReadResourceResult | types.InputRequiredResult:
        uri = str(params.uri)
        call = await self._acts.run_relaying(self._read, ctx, params, action="read", name=uri, arguments={"uri": uri})
        if isinstance(call, types.InputRequiredResult):  # the upstream asks the agent first (2026-07-28)
            return call
        if not returnable(call):
            raise to_mcp_error(call.error or InternalError("read", "no result"), uri=uri)
        if call.output is not None and call.output.is_error:
            raise source_error(call.output, uri=uri)
        return read_result(uri, call.output)

    async def _subscribe(self, ctx: ServerRequestContext[Any, Any], uri: str, session: Any, meta: object = None) -> Any:
        """The subscription act: the read pipeline's stages with `action=subscribe` (READ on the
        resource, policy, audit); allowed, it adds the subscriber (`session`; None: a listen stream)."""
        subscriptions = self.subscriptions
        assert subscriptions is not None
        found = self._catalog.find(uri)
        target = None
        if found is not None:
            target = SubscribeTarget(
                found, lambda: subscriptions.add(uri, session), watchable=subscriptions.can_watch(uri)
            )
        return await self._acts.run(
            self._read, ctx, action="subscribe", name=uri, arguments={"uri": uri}, meta=meta, tool=target
        )

    async def subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        """`resources/subscribe` (2025 sessions): from now on the session hears of the resource's updates,
        until it unsubscribes or closes. Refused like a read (a JSON-RPC error naming the URI)."""
        uri = str(params.uri)
        session = connection_of(ctx)
        if self.subscriptions is not None and self.subscriptions.subscribed(uri, session):
            return types.EmptyResult()
        call = await self._subscribe(ctx, uri, session, params.meta)
        if not returnable(call):
            raise to_mcp_error(call.error or InternalError("subscribe", "no result"), uri=uri)
        if call.output is not None and call.output.is_error:
            raise source_error(call.output, uri=uri)
        return types.EmptyResult()

    async def unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        """`resources/unsubscribe`: the session's own subscription ends (nothing to decide: it only
        takes away); unsubscribing from what it never subscribed to is not an error."""
        if self.subscriptions is not None:
            await self.subscriptions.remove(str(params.uri), connection_of(ctx))
        return types.EmptyResult()

    async def listened(self, ctx: ServerRequestContext[Any, Any], uris: list[str]) -> list[str]:
        """The `resourceSubscriptions` of a 2026-07-28 listen stream the caller may have: each decided
        and audited like `resources/subscribe`, and held until `unlistened`. The rest are not honored."""
        if self.subscriptions is None:
            return []
        honored = []
        for uri in list(dict.fromkeys(uris))[:MAX_LISTENED]:
            call = await self._subscribe(ctx, uri, None)
            if returnable(call) and call.output is not None and not call.output.is_error:
                honored.append(uri)
        return honored

    async def unlistened(self, uris: list[str]) -> None:
        """A listen stream ended: its subscriptions go."""
        if self.subscriptions is not None:
            for uri in uris:
                await self.subscriptions.remove(uri)
