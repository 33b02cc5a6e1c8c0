"""Resource subscriptions: each source watches exactly the URIs of its own resources someone is
subscribed to, updates reach only the subscribed sessions, and a closed session lets go of its own."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, ServerEvent

from server.resources.catalog import ResourceCatalog
from server.resources.subscriptions import ResourceSubscriptions
from tests.unit.server.resources.test_catalog import target

pytestmark = pytest.mark.anyio


class Session:
    """A 2025 connection as the SDK has it: an exit stack unwound when it closes, and a sender."""

    def __init__(self, *, broken: bool = False) -> None:
        self.exit_stack = AsyncExitStack()
        self.heard: list[str] = []
        self.broken = broken

    async def send_resource_updated(self, uri: str) -> None:
        if self.broken:
            raise ConnectionError("gone")
        self.heard.append(uri)


class Source:
    def __init__(self) -> None:
        self.watched: list[frozenset[str]] = []

    async def __call__(self, uris: frozenset[str]) -> None:
        self.watched.append(uris)


def setup() -> tuple[ResourceSubscriptions, Source, Source, list[ServerEvent]]:
    catalog = ResourceCatalog()
    catalog.sync("a", [target("a://one", source="a"), target("a://t/{id}", template=True, source="a")])
    catalog.sync("b", [target("b://two", source="b")])
    bus = InMemorySubscriptionBus()
    published: list[ServerEvent] = []
    bus.subscribe(published.append)
    subscriptions = ResourceSubscriptions(catalog, bus)
    a, b = Source(), Source()
    subscriptions.source("a", a)
    subscriptions.source("b", b)
    return subscriptions, a, b, published


async def test_each_source_watches_only_its_own_subscribed_uris() -> None:
    subscriptions, a, b, _ = setup()
    one, two = Session(), Session()
    await subscriptions.add("a://one", one)
    await subscriptions.add("a://t/7", two)  # under a's template
    await subscriptions.add("b://two", two)
    assert a.watched[-1] == {"a://one", "a://t/7"}
    assert b.watched[-1] == {"b://two"}
    await subscriptions.remove("a://one", one)
    assert a.watched[-1] == {"a://t/7"}


async def test_a_uri_stays_watched_while_anyone_is_subscribed() -> None:
    subscriptions, a, _, _ = setup()
    one, two = Session(), Session()
    await subscriptions.add("a://one", one)
    await subscriptions.add("a://one", one)  # the same session again: counted once
    await subscriptions.add("a://one")  # a listen stream
    await subscriptions.add("a://one", two)
    await subscriptions.remove("a://one", one)
    await subscriptions.remove("a://one", one)  # not subscribed any more: nothing changes
    await subscriptions.remove("a://one")
    assert a.watched[-1] == {"a://one"}
    await subscriptions.remove("a://one", two)
    assert a.watched[-1] == frozenset()


async def test_an_update_reaches_the_subscribed_sessions_and_the_listen_streams() -> None:
    subscriptions, _, _, published = setup()
    subscribed, other = Session(), Session()
    await subscriptions.add("a://one", subscribed)
    await subscriptions.add("b://two", other)
    await subscriptions.updated("a", "a://one")
    assert subscribed.heard == ["a://one"]
    assert other.heard == []
    assert published == [ResourceUpdated(uri="a://one")]


async def test_a_source_cannot_announce_another_sources_resource() -> None:
    subscriptions, _, _, published = setup()
    session = Session()
    await subscriptions.add("b://two", session)
    await subscriptions.updated("a", "b://two")
    assert session.heard == []
    assert published == []


async def test_a_closed_session_lets_go_of_its_subscriptions() -> None:
    subscriptions, a, _, _ = setup()
    session = Session()
    await subscriptions.add("a://one", session)
    await subscriptions.add("a://t/1", session)
    await session.exit_stack.aclose()  # the SDK closes the connection
    assert a.watched[-1] == frozenset()
    assert not subscriptions.subscribed("a://one", session)


async def test_a_session_that_cannot_be_told_is_dropped() -> None:
    subscriptions, a, _, _ = setup()
    gone = Session(broken=True)
    await subscriptions.add("a://one", gone)
    await subscriptions.updated("a", "a://one")
    assert a.watched[-1] == frozenset()


async def test_subscribe_is_served_only_when_a_source_sends_updates() -> None:
    catalog = ResourceCatalog()
    catalog.sync("a", [target("a://one", source="a")])
    subscriptions = ResourceSubscriptions(catalog, InMemorySubscriptionBus())
    sends = False
    subscriptions.source("a", Source(), lambda: sends)
    assert not subscriptions.served()
    assert not subscriptions.can_watch("a://one")
    sends = True
    assert subscriptions.served()
    assert subscriptions.can_watch("a://one")
    assert not subscriptions.can_watch("a://unknown")


async def test_a_failed_watch_is_tried_again_on_the_next_change() -> None:
    subscriptions, _, _, _ = setup()
    calls: list[frozenset[str]] = []

    async def flaky(uris: frozenset[str]) -> None:
        calls.append(uris)
        if len(calls) == 1:
            raise ConnectionError("upstream down")

    subscriptions.source("a", flaky)
    session: Any = Session()
    await subscriptions.add("a://one", session)  # fails: logged, not raised
    await subscriptions.reconnected("a")
    assert calls == [frozenset({"a://one"}), frozenset({"a://one"})]
