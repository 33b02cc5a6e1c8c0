"""The approval store contract, run against both stores: SQLite and a real redis-server. Two queues on
one store stand for two gateway replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.approvals.errors import ApprovalConflict
from server.approvals.queue import ApprovalQueue
from server.approvals.request import Actor, ApprovalRequest, new_request_id
from server.approvals.stage import ApprovalStage
from server.approvals.store import ApprovalStore, SqliteApprovals
from server.errors import BackendUnavailable
from server.policy.engine import Decision
from server.settings import ApprovalSettings
from tests.fakes.backends import make_call, make_identity
from tests.redis_server import RedisProcess, run_redis

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ADMIN = make_identity(agent_id="ops-bot", subject="bob", groups=("admins",))
BOB = Actor("ops-bot", "bob", "castellan-dev", ("admins",))
SETTINGS = ApprovalSettings(timeout_seconds=5, poll_interval_seconds=0.05)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with run_redis() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, redis: RedisProcess
) -> AsyncIterator[Callable[[], ApprovalStore]]:
    made: list[ApprovalStore] = []
    if request.param == "redis":
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(redis.url) as client:
            await client.flushdb()

    def make() -> ApprovalStore:
        from server.approvals.redis import RedisApprovals

        store: ApprovalStore = (
            SqliteApprovals(tmp_path / "approvals.db") if request.param == "sqlite" else RedisApprovals(redis.url)
        )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def request_at(now: float, *, binding: str = "b1", expires_in: float = 60, **overrides: Any) -> ApprovalRequest:
    values: dict[str, Any] = {
        "id": new_request_id(), "call_id": "c1", "tool": "demo.reset", "arguments": {"q": 1},
        "arguments_sha256": "ab" * 32, "caller": Actor("agent-1", "alice", "castellan-dev", ("analysts",)),
        "run_id": "r1", "groups": ("admins",), "reason": "why", "summary": "what", "requested_at": now,
        "expires_at": now + expires_in, "binding": binding, "securable": "main.admin.reset_demo",
        "annotations": {"destructiveHint": True},
    }  # fmt: skip
    values.update(overrides)
    return ApprovalRequest(**values)


async def test_a_request_reads_back_as_written(make_store: Callable[[], ApprovalStore]) -> None:
    store = make_store()
    request = request_at(time.time())
    await store.create(request)
    assert await store.get(request.id) == request
    assert await store.get("apr_missing") is None


async def test_decide_only_a_pending_unexpired_request_and_use_only_an_approved_one(
    make_store: Callable[[], ApprovalStore],
) -> None:
    store = make_store()
    now = time.time()
    request = request_at(now)
    await store.create(request)
    assert not await store.use(request.id, "c1")  # not approved yet
    assert await store.decide(request.id, "approved", BOB, "ok", now)
    assert not await store.decide(request.id, "denied", BOB, "changed my mind", now)
    assert await store.use(request.id, "c1")
    assert not await store.use(request.id, "c2")  # one approval, one run
    got = await store.get(request.id)
    assert got is not None
    assert (got.status, got.used_by, got.decided_by, got.comment) == ("used", "c1", BOB, "ok")
    lapsed = request_at(now - 120, expires_in=60)
    await store.create(lapsed)
    assert not await store.decide(lapsed.id, "approved", BOB, "", now)


async def test_open_for_finds_the_binding_s_pending_or_approved_request_only(
    make_store: Callable[[], ApprovalStore],
) -> None:
    store = make_store()
    now = time.time()
    old = request_at(now - 120, expires_in=60)
    await store.create(old)
    assert await store.open_for("b1", now) is None  # expired
    fresh = request_at(now)
    await store.create(fresh)
    assert (await store.open_for("b1", now)).id == fresh.id  # type: ignore[union-attr]
    assert await store.open_for("other", now) is None
    await store.decide(fresh.id, "denied", BOB, "", now)
    assert await store.open_for("b1", now) is None


async def test_list_filters_by_status_as_it_stands_now_newest_first(make_store: Callable[[], ApprovalStore]) -> None:
    store = make_store()
    now = time.time()
    lapsed, waiting, denied = request_at(now - 90, expires_in=60), request_at(now - 1), request_at(now)
    for request in (lapsed, waiting, denied):
        await store.create(request)
    await store.decide(denied.id, "denied", BOB, "", now)
    assert [r.id for r in await store.list(("pending",), now, 10, 0)] == [waiting.id]
    assert [r.id for r in await store.list(("expired",), now, 10, 0)] == [lapsed.id]
    assert [r.id for r in await store.list(None, now, 10, 0)] == [denied.id, waiting.id, lapsed.id]
    assert [r.id for r in await store.list(None, now, 1, 1)] == [waiting.id]
    await store.expire(waiting.id)
    assert (await store.get(waiting.id)).status == "expired"  # type: ignore[union-attr]


async def test_a_decision_through_one_replica_releases_the_call_waiting_in_another(
    make_store: Callable[[], ApprovalStore],
) -> None:
    here, there = ApprovalQueue(make_store(), SETTINGS), ApprovalQueue(make_store(), SETTINGS)
    call = make_call(decision=Decision(allow=True, obligations={"require_approval": {"groups": ["admins"]}}))
    waiting = asyncio.create_task(ApprovalStage(here).run(call))
    for _ in range(200):
        found = await there.list()
        if found:
            break
        await asyncio.sleep(0.02)
    (request,) = found
    await there.approve(request.id, ADMIN)
    assert (await asyncio.wait_for(waiting, 5)).approval["status"] == "approved"  # type: ignore[index]
    with pytest.raises(ApprovalConflict):
        await here.approve(request.id, ADMIN)


async def test_a_store_that_cannot_answer_denies_the_waiting_call(tmp_path: Path) -> None:
    from server.approvals.redis import RedisApprovals

    with run_redis() as server:
        store = RedisApprovals(server.url, timeout=0.5)
        queue = ApprovalQueue(store, SETTINGS)
        call = make_call(decision=Decision(allow=True, obligations={"require_approval": {"groups": ["admins"]}}))
        waiting = asyncio.create_task(ApprovalStage(queue).run(call))
        for _ in range(200):
            if await queue.list():
                break
            await asyncio.sleep(0.02)
        server.stop()
        with pytest.raises(BackendUnavailable, match="approval queue unavailable"):
            await asyncio.wait_for(waiting, 10)
        await store.close()


async def test_requests_long_past_their_expiry_are_dropped(make_store: Callable[[], ApprovalStore]) -> None:
    from server.approvals.store import RETENTION_SECONDS

    store = make_store()
    now = time.time()
    ancient = request_at(now - RETENTION_SECONDS - 120, expires_in=60)
    await store.create(ancient)
    await store.create(request_at(now))  # SQLite drops old rows as it writes; Redis keys expire
    await asyncio.sleep(0.05)
    assert await store.get(ancient.id) is None
    listed = [r.id for r in await store.list(None, now, 10, 0)]
    assert len(listed) == 1
    assert ancient.id not in listed
