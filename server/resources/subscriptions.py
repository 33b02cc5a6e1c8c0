"""Resource subscriptions: which agents are subscribed to which resource, the watches on the sources
that serve them, and the delivery of `notifications/resources/updated` to those agents."""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from server.resources.catalog import ResourceCatalog

log = structlog.get_logger("castellan.protocol")

Watch = Callable[[frozenset[str]], Awaitable[None]]
"""Tells a source (an upstream) the URIs of its resources someone is subscribed to now; it sends
updates of those (and only those) from then on. Raises when the source cannot be reached."""


class ResourceSubscriptions:
    """Subscribers by URI: 2025-era sessions (`resources/subscribe`, each held weakly and released when
    its connection closes) and 2026-07-28 `subscriptions/listen` streams (counted while they are open;
    the SDK's listen handler filters what each stream hears). While a URI has a subscriber its source
    watches it (`watch`, told the whole set of its URIs on each change); `updated` delivers a source's
    update to the sessions subscribed to that URI and publishes it for the listen streams.

    A source only speaks for its own resources: an update for a URI another source serves is dropped.
    Whether a subscriber may read the resource is decided before it is added (server.protocol.resources)."""

    def __init__(self, catalog: ResourceCatalog, bus: SubscriptionBus) -> None:
        self._catalog = catalog
        self._bus = bus
        self._watches: dict[str, Watch] = {}
        self._sends: dict[str, Callable[[], bool]] = {}
        self._counts: Counter[str] = Counter()
        self._sessions: dict[str, weakref.WeakSet[Any]] = {}
        self._of_session: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._watched: dict[str, frozenset[str]] = {}
        self._lock = asyncio.Lock()

    def source(self, name: str, watch: Watch, sends: Callable[[], bool] = lambda: True) -> None:
        """`name` (an upstream) is watched with `watch`; `sends` says whether it sends updates at all
        (it declared `resources.subscribe`)."""
        self._watches[name] = watch
        self._sends[name] = sends

    def served(self) -> bool:
        """Some source sends updates: `resources.subscribe` is declared only then."""
        return any(sends() for sends in self._sends.values())

    def source_of(self, uri: str) -> str | None:
        target = self._catalog.find(uri)
        return target.spec.upstream if target is not None else None

    def can_watch(self, uri: str) -> bool:
        source = self.source_of(uri)
        return source is not None and source in self._watches and self._sends[source]()

    async def add(self, uri: str, session: Any = None) -> None:
        """One more subscriber of `uri`: `session` (a 2025 connection) or, with None, a listen stream.
        A session subscribed already is not counted twice."""
        if session is not None:
            held = self._of_session.get(session)
            if held is None:
                held = self._of_session[session] = set()
                _on_close(session, self._released(weakref.ref(session)))
            if uri in held:
                return
            held.add(uri)
            self._sessions.setdefault(uri, weakref.WeakSet()).add(session)
        self._counts[uri] += 1
        await self._rewatch(self.source_of(uri))

    async def remove(self, uri: str, session: Any = None) -> None:
        """One subscriber of `uri` fewer (`session`'s subscription; None: a listen stream's)."""
        if session is not None:
            held = self._of_session.get(session)
            if held is None or uri not in held:
                return
            held.discard(uri)
            self._sessions.get(uri, weakref.WeakSet()).discard(session)
        await self._drop([uri])

    def subscribed(self, uri: str, session: Any) -> bool:
        return uri in self._of_session.get(session, ())

    async def _drop(self, uris: list[str]) -> None:
        sources = set()
        for uri in uris:
            self._counts[uri] -= 1
            if self._counts[uri] <= 0:
                del self._counts[uri]
                self._sessions.pop(uri, None)
            sources.add(self.source_of(uri))
        for source in sources:
            await self._rewatch(source)

    def _released(self, session: weakref.ref[Any]) -> Callable[[], Awaitable[None]]:
        async def release() -> None:
            held = self._of_session.pop(session(), None) if session() is not None else None
            if held:
                log.info("resource_subscriptions_released", uris=len(held))
                await self._drop(sorted(held))

        return release

    async def _rewatch(self, source: str | None) -> None:
        """Tell `source` the URIs of its own resources that someone is subscribed to now."""
        watch = self._watches.get(source) if source is not None else None
        if watch is None or source is None:
            return
        async with self._lock:
            uris = frozenset(u for u in self._counts if self.source_of(u) == source)
            if self._watched.get(source) == uris:
                return
            try:
                await watch(uris)
            except Exception as exc:  # the next change (or the source's reconnection) tries again
                log.warning("resource_watch_failed", upstream=source, error=str(exc)[:300])
                return
            self._watched[source] = uris

    async def reconnected(self, source: str) -> None:
        """`source` lost what it watched (it reconnected): watch again."""
        self._watched.pop(source, None)
        await self._rewatch(source)

    async def updated(self, source: str, uri: str) -> None:
        """`source` says `uri` changed: tell its subscribers. Never raises."""
        if self.source_of(uri) != source:
            log.info("resource_update_dropped", upstream=source, uri=uri[:300], reason="not served by this upstream")
            return
        sessions = list(self._sessions.get(uri, ()))
        for session in sessions:
            try:
                await session.send_resource_updated(uri)
            except Exception as exc:  # a session that went away: its subscriptions go with it
                log.debug("resource_update_not_sent", uri=uri[:300], error=repr(exc))
                await self.remove(uri, session)
        await self._bus.publish(ResourceUpdated(uri=uri))
        log.info("resource_updated", upstream=source, uri=uri[:300], sessions=len(sessions))


def _on_close(session: Any, release: Callable[[], Awaitable[None]]) -> None:
    """Run `release` when the 2025 session's connection closes (the SDK unwinds its exit stack)."""
    stack = getattr(session, "exit_stack", None)
    if stack is not None:
        stack.push_async_callback(release)
