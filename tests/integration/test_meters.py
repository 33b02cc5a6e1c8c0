"""The meter contract, run against both stores: SQLite and a real redis-server."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.call import RunInfo
from server.errors import BackendUnavailable, Denied
from server.metering.meter import Admission, Meter
from server.metering.redis import RedisMeter
from server.metering.sqlite import SqliteMeter
from server.settings import Limits
from server.testing import make_identity
from tests.redis_server import RedisProcess, run_redis

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
AGENT = make_identity(agent_id="metered-bot")
OPEN = {"calls_per_minute": 0, "concurrent_calls": 0, "max_run_calls": 0, "max_repeats": 0, "tokens_per_day": 0}


def limits(**values: int) -> Limits:
    return Limits(**{**OPEN, **values})


def admission(lim: Limits, estimate: int = 10, key: str | None = None, ttl: float = 60) -> Admission:
    return Admission(
        call_key=key or uuid.uuid4().hex, limits=lim, estimate=estimate, reservation=uuid.uuid4().hex, ttl=ttl
    )


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with run_redis() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
async def meter(request: pytest.FixtureRequest, tmp_path: Path, redis: RedisProcess) -> AsyncIterator[Meter]:
    if request.param == "redis":
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(redis.url) as client:
            await client.flushdb()  # one redis-server for the module: each test starts empty
    store: Meter = SqliteMeter(tmp_path / "meters.db") if request.param == "sqlite" else RedisMeter(redis.url)
    yield store
    await store.close()


async def test_a_run_is_cut_off_at_exactly_the_maximum(meter: Meter) -> None:
    lim, run = limits(max_run_calls=5), RunInfo(run_id="r1")
    for i in range(5):
        assert (await meter.admit(AGENT, run, admission(lim))).run_calls == i + 1
    with pytest.raises(Denied, match="loop depth: run r1 reached the maximum of 5 tool calls"):
        await meter.admit(AGENT, run, admission(lim))
    await meter.admit(AGENT, RunInfo(run_id="r2"), admission(lim))


async def test_the_same_call_repeated_is_a_loop_with_the_count(meter: Meter) -> None:
    lim, run = limits(max_repeats=3), RunInfo(run_id="r1")
    for _ in range(3):
        await meter.admit(AGENT, run, admission(lim, key="same"))
    with pytest.raises(Denied, match=r"the same tool and arguments 4 times in run r1 \(max 3\)"):
        await meter.admit(AGENT, run, admission(lim, key="same"))
    await meter.admit(AGENT, run, admission(lim, key="other"))


async def test_nesting_deeper_than_the_maximum_is_denied(meter: Meter) -> None:
    with pytest.raises(Denied, match="nesting depth: run depth 4 exceeds the maximum of 3"):
        await meter.admit(AGENT, RunInfo(run_id="r", depth=4), admission(limits(max_depth=3)))


async def test_calls_per_minute_name_the_window_usage_and_reset(meter: Meter) -> None:
    lim = limits(calls_per_minute=2)
    for _ in range(2):
        await meter.admit(AGENT, RunInfo(run_id=uuid.uuid4().hex), admission(lim))
    with pytest.raises(Denied, match=r"rate limit: 2 of 2 calls per minute used \(retry_after=\d+s\)"):
        await meter.admit(AGENT, RunInfo(run_id="x"), admission(lim))


async def test_settled_tokens_exhaust_the_budget(meter: Meter) -> None:
    lim = limits(tokens_per_day=100)
    first = admission(lim, estimate=60)
    await meter.admit(AGENT, RunInfo(run_id="a"), first)
    await meter.settle(AGENT, first.reservation, 70)
    with pytest.raises(Denied, match=r"token budget: 70 of 100 tokens per day used, 0 reserved .* needs 40"):
        await meter.admit(AGENT, RunInfo(run_id="b"), admission(lim, estimate=40))
    await meter.admit(AGENT, RunInfo(run_id="c"), admission(lim, estimate=30))


async def test_reservations_count_until_released(meter: Meter) -> None:
    lim = limits(tokens_per_hour=100)
    held = admission(lim, estimate=80)
    await meter.admit(AGENT, RunInfo(run_id="a"), held)
    with pytest.raises(Denied, match=r"tokens per hour used, 80 reserved by calls in flight"):
        await meter.admit(AGENT, RunInfo(run_id="b"), admission(lim, estimate=30))
    await meter.release(AGENT, held.reservation)
    await meter.admit(AGENT, RunInfo(run_id="c"), admission(lim, estimate=30))


async def test_concurrent_calls_are_limited_and_freed_on_settle(meter: Meter) -> None:
    lim = limits(concurrent_calls=2)
    first, second = admission(lim), admission(lim)
    await meter.admit(AGENT, RunInfo(run_id="a"), first)
    await meter.admit(AGENT, RunInfo(run_id="b"), second)
    with pytest.raises(Denied, match=r"concurrency limit: 2 of 2 calls in flight"):
        await meter.admit(AGENT, RunInfo(run_id="c"), admission(lim))
    await meter.settle(AGENT, first.reservation, 5)
    await meter.admit(AGENT, RunInfo(run_id="d"), admission(lim))


async def test_a_reservation_that_never_settles_expires(meter: Meter) -> None:
    lim = limits(concurrent_calls=1)
    await meter.admit(AGENT, RunInfo(run_id="a"), admission(lim, ttl=1.0))
    with pytest.raises(Denied, match="concurrency limit"):
        await meter.admit(AGENT, RunInfo(run_id="b"), admission(lim))
    await asyncio.sleep(1.2)
    await meter.admit(AGENT, RunInfo(run_id="c"), admission(lim))


async def test_usage_reports_consumption_against_limits(meter: Meter) -> None:
    lim = limits(calls_per_minute=10, tokens_per_day=1000)
    done = admission(lim, estimate=50)
    await meter.admit(AGENT, RunInfo(run_id="a"), done)
    await meter.settle(AGENT, done.reservation, 42)
    await meter.admit(AGENT, RunInfo(run_id="b"), admission(lim, estimate=7))
    usage = await meter.usage(AGENT.agent_id, lim)
    minute = next(w for w in usage.calls if w.window == "minute")
    day = next(w for w in usage.tokens if w.window == "day")
    assert (minute.used, minute.limit, day.used, day.limit) == (2, 10, 42, 1000)
    assert (usage.in_flight, usage.reserved_tokens) == (1, 7)


async def test_64_concurrent_clients_never_pass_a_10000_token_budget(meter: Meter) -> None:
    lim = limits(tokens_per_day=10_000)
    served: list[int] = []
    denied: list[str] = []

    async def client(n: int) -> None:
        rng = random.Random(n)
        for attempt in range(6):
            estimate = rng.randint(100, 400)
            ticket = admission(lim, estimate=estimate)
            try:
                await meter.admit(AGENT, RunInfo(run_id=f"{n}-{attempt}"), ticket)
            except Denied as exc:
                denied.append(exc.reasons[0])
                continue
            await asyncio.sleep(rng.random() / 100)  # the tool runs
            used = rng.randint(estimate // 2, estimate)  # never more than reserved (the charge stage truncates)
            await meter.settle(AGENT, ticket.reservation, used)
            served.append(used)

    await asyncio.gather(*(client(n) for n in range(64)))
    usage = await meter.usage(AGENT.agent_id, lim)
    charged = next(w.used for w in usage.tokens if w.window == "day")
    assert charged == sum(served) <= 10_000
    assert served
    assert denied
    assert all(reason.startswith("token budget: ") and "per day" in reason for reason in denied)
    assert len(served) + len(denied) == 64 * 6


async def test_redis_down_denies_with_a_clear_reason_and_recovers(redis: RedisProcess) -> None:
    meter = RedisMeter(redis.url)
    await meter.admit(AGENT, RunInfo(run_id="a"), admission(limits()))
    redis.stop()
    try:
        with pytest.raises(BackendUnavailable, match=r"meter store unavailable \(redis\)"):
            await meter.admit(AGENT, RunInfo(run_id="b"), admission(limits()))
        with pytest.raises(BackendUnavailable):
            await meter.check()
    finally:
        redis.start()
    await meter.admit(AGENT, RunInfo(run_id="c"), admission(limits()))
    await meter.close()
