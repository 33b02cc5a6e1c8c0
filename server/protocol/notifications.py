"""List-changed notifications: agents hear that the tools, resources or prompts served changed (an upstream
added one, a definition was quarantined or approved) without reconnecting, in both protocol eras."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import mcp_types as types
import structlog
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.protocol.logging import connection_of

log = structlog.get_logger("castellan.protocol")

KINDS = ("tools", "resources", "prompts")


class ListChanges:
    """Delivers list changes: on 2026-07-28 to every open `subscriptions/listen` stream that asked for
    that kind (`listen`, the SDK's handler: acknowledged first, each frame tagged with its subscription
    id, nothing it did not ask for), on 2025-11-25 to every session the gateway has seen, on its
    standalone stream. A notification says only that a list changed: each client then lists again
    and sees what grants and policy let it see."""

    def __init__(self) -> None:
        self.bus = InMemorySubscriptionBus()
        self._listen = ListenHandler(self.bus)
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self.listened: Callable[[ServerRequestContext[Any, Any], list[str]], Awaitable[list[str]]] | None = None
        """Decides a listen stream's `resourceSubscriptions` (the ones the caller may have); None: none honored."""
        self.unlistened: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        """`subscriptions/listen`: the SDK's handler, with the resource subscriptions the caller asked for
        cut to those it may have (`listened`); the acknowledgment says which are honored."""
        asked = list(params.notifications.resource_subscriptions or ())
        honored = await self.listened(ctx, asked) if asked and self.listened is not None else []
        if asked:
            notifications = params.notifications.model_copy(update={"resource_subscriptions": honored or None})
            params = params.model_copy(update={"notifications": notifications})
        try:
            return await self._listen(ctx, params)
        finally:
            if honored and self.unlistened is not None:
                # the stream is being cancelled (the client went away): release in a task of its own
                task = asyncio.get_running_loop().create_task(self.unlistened(honored))
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)

    def seen(self, ctx: ServerRequestContext[Any, Any]) -> None:
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._sessions.add(connection_of(ctx))

    async def changed(self, kinds: Iterable[str]) -> None:
        """Tell everyone listening that the `kinds` lists changed; never raises."""
        events: dict[str, ServerEvent] = {
            "tools": ToolsListChanged(),
            "resources": ResourcesListChanged(),
            "prompts": PromptsListChanged(),
        }
        for kind in dict.fromkeys(kinds):
            await self.bus.publish(events[kind])
            for connection in list(self._sessions):
                try:
                    await getattr(connection, f"send_{kind[:-1]}_list_changed")()
                except Exception as exc:  # a session that went away: forget it
                    log.debug("list_changed_not_sent", kind=kind, error=repr(exc))
                    self._sessions.discard(connection)
        log.info("list_changed", kinds=sorted(set(kinds)))

    def close(self) -> None:
        self._listen.close()


class SessionTracker(ServerMiddleware[Any]):
    """Notes every 2025-era session that sends a request, so list changes reach it."""

    def __init__(self, changes: ListChanges) -> None:
        self._changes = changes

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "initialize":  # the connection is ready only after the handshake
            self._changes.seen(ctx)
        return await call_next(ctx)
