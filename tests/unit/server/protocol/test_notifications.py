"""A 2026-07-28 listen stream honors only the resource subscriptions the caller may have, and gives
them back when it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import mcp_types as types
import pytest
from mcp.server.subscriptions import ResourceUpdated

from server.protocol.notifications import ListChanges

pytestmark = pytest.mark.anyio


class Session:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.acked = asyncio.Event()

    async def send_notification(self, notification: Any, related_request_id: Any = None) -> None:
        self.sent.append(notification)
        self.acked.set()


class Ctx:
    def __init__(self) -> None:
        self.request_id = "listen-1"
        self.session = Session()


async def test_the_ack_honors_only_the_resources_the_caller_may_have() -> None:
    changes = ListChanges()
    decided: list[list[str]] = []
    released: list[list[str]] = []

    async def listened(ctx: Any, uris: list[str]) -> list[str]:
        decided.append(uris)
        return [u for u in uris if u != "x://secret"]

    async def unlistened(uris: list[str]) -> None:
        released.append(uris)

    changes.listened, changes.unlistened = listened, unlistened
    ctx = Ctx()
    params = types.SubscriptionsListenRequestParams(
        notifications=types.SubscriptionFilter(resource_subscriptions=["x://open", "x://secret"])
    )
    stream = asyncio.ensure_future(changes.listen(ctx, params))  # type: ignore[arg-type]
    await asyncio.wait_for(ctx.session.acked.wait(), 5)
    await changes.bus.publish(ResourceUpdated(uri="x://secret"))
    await changes.bus.publish(ResourceUpdated(uri="x://open"))
    changes.close()
    await asyncio.wait_for(stream, 5)
    await asyncio.sleep(0)  # the release runs in a task of its own
    ack, *frames = ctx.session.sent
    assert ack.params.notifications.resource_subscriptions == ["x://open"]
    assert [f.params.uri for f in frames] == ["x://open"]  # nothing of what it may not have
    assert decided == [["x://open", "x://secret"]]
    assert released == [["x://open"]]


async def test_a_stream_without_resources_decides_nothing() -> None:
    changes = ListChanges()

    async def listened(ctx: Any, uris: list[str]) -> list[str]:
        raise AssertionError("nothing to decide")

    changes.listened = listened
    ctx = Ctx()
    params = types.SubscriptionsListenRequestParams(notifications=types.SubscriptionFilter(tools_list_changed=True))
    stream = asyncio.ensure_future(changes.listen(ctx, params))  # type: ignore[arg-type]
    await asyncio.wait_for(ctx.session.acked.wait(), 5)
    changes.close()
    await asyncio.wait_for(stream, 5)
    assert ctx.session.sent[0].params.notifications.tools_list_changed is True
