"""The meter contract, run against every store: SQLite (write-through, and held in memory with
write-behind) and a real redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from server.call import RunInfo
from server.errors import BackendUnavailable, Denied
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Admission, Meter
from server.metering.redis import RedisMeter
from server.metering.sqlite import SqliteMeter
from server.settings import Limits
from tests.fakes.backends import make_identity
from tests.redis_server import RedisProcess, run_redis

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
AGENT = make_identity(agent_id="metered-bot")
OPEN = {
    "calls_per_minute": 0,
    "concurrent_calls": 0,
    "max_run_calls": 0,
    "max_repeats": 0,
    "tokens_per_day": 0,
    "max_identical_calls": 0,
    "max_calls_per_tool": 0,
}


def limits(**values: int) -> Limits:
    return Limits(**{**OPEN, **values})


def admission(
    lim: Limits, estimate: int = 10, key: str | None = None, ttl: float = 60, tool: str = "echo"
) -> Admission:
    return Admission(
        call_key=key or uuid.uuid4().hex,
        limits=lim,
        estimate=estimate,
        reservation=uuid.uuid4().hex,
        ttl=ttl,
        tool=tool,
    )


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with run_redis() as server:
        yield server


@pytest.fixture(params=["sqlite", "buffered", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_meter(store: str, tmp_path: Path, redis: RedisProcess) -> AsyncIterator[Callable[..., Meter]]:
    """Meters on one store, as several gateway processes would have (each its own instance)."""
    if store == "redis":
        import redis.asyncio as aioredis

        async with aioredis.Redis.from_url(redis.url) as client:
            await client.flushdb()  # one redis-server for the module: each test starts empty
    made: list[Meter] = []

    def make(**options: float) -> Meter:
        meter: Meter = (
            SqliteMeter(tmp_path / "meters.db", **options)
            if store == "sqlite"
            else BufferedSqliteMeter(tmp_path / "meters.db", **options)
            if store == "buffered"
            else RedisMeter(redis.url, **options)
        )
        made.append(meter)
        return meter

    yield make
    for meter in made:
        await meter.close()


@pytest.fixture
async def meter(make_meter: Callable[..., Meter]) -> Meter:
    return make_meter()


async def test_the_budget_carries_the_sliding_window_limits_it_was_admitted_under(meter: Meter) -> None:
    lim = limits(max_identical_calls=7, identical_calls_window_seconds=90, max_calls_per_tool=40,
                 tool_calls_window_seconds=30)  # fmt: skip
    budget = await meter.admit(AGENT, RunInfo(run_id="r1"), admission(lim))
    assert (budget.identical_calls_limit, budget.identical_calls_window_seconds) == (7, 90)
    assert (budget.tool_calls_limit, budget.tool_calls_window_seconds) == (40, 30)


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


# Limits that do not depend on anything the caller declares: a fresh run id per call evades nothing.


async def test_identical_calls_are_a_loop_whatever_run_the_caller_declares(meter: Meter) -> None:
    lim = limits(max_identical_calls=4)
    for i in range(4):
        budget = await meter.admit(AGENT, RunInfo(run_id=f"fresh-{i}"), admission(lim, key="same"))
        assert budget.identical_calls == i + 1
    with pytest.raises(Denied, match=r"loop detected: the same tool and arguments 5 times in the last 300s .*max 4"):
        await meter.admit(AGENT, RunInfo(run_id="fresh-5"), admission(lim, key="same"))
    await meter.admit(AGENT, RunInfo(run_id="fresh-6"), admission(lim, key="different"))
    other = make_identity(agent_id="someone-else")
    await meter.admit(other, RunInfo(run_id="fresh-7"), admission(lim, key="same"))  # per identity


async def test_calls_per_tool_over_a_sliding_window_are_exact_under_concurrency(meter: Meter) -> None:
    lim = limits(max_calls_per_tool=10, tool_calls_window_seconds=60)

    async def one(i: int) -> str:
        try:
            await meter.admit(AGENT, RunInfo(run_id=f"r{i}"), admission(lim, tool="sql.query"))
            return "ok"
        except Denied as exc:
            return exc.reasons[0]

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert results.count("ok") == 10
    refusals = [r for r in results if r != "ok"]
    assert all(r.startswith("tool rate limit: 10 of 10 calls of sql.query in the last 60s used") for r in refusals)
    await meter.admit(AGENT, RunInfo(run_id="x"), admission(lim, tool="echo"))  # another tool is separate


async def test_a_sliding_window_frees_as_its_oldest_calls_leave_it(meter: Meter) -> None:
    lim = limits(max_identical_calls=2, identical_calls_window_seconds=1)
    await meter.admit(AGENT, RunInfo(run_id="a"), admission(lim, key="same"))
    await meter.admit(AGENT, RunInfo(run_id="b"), admission(lim, key="same"))
    with pytest.raises(Denied, match=r"retry_after=1s"):
        await meter.admit(AGENT, RunInfo(run_id="c"), admission(lim, key="same"))
    await asyncio.sleep(1.1)
    await meter.admit(AGENT, RunInfo(run_id="d"), admission(lim, key="same"))


# Reservations of a gateway process that is gone are released by the next one, not held until they expire.


def _finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_a_dead_process_reservations_are_released_at_start(make_meter: Callable[..., Meter]) -> None:
    if isinstance(make_meter(), BufferedSqliteMeter):
        pytest.skip("several meters on one file: the buffered meter serves one process (tests/unit: its crash)")
    lim = limits(concurrent_calls=12, tokens_per_day=100_000)
    crashed = make_meter()
    crashed.instance = dataclasses.replace(crashed.instance, pid=_finished_pid(), pid_start="1")  # type: ignore[attr-defined]
    await crashed.start()
    held = [admission(lim, estimate=4_000) for _ in range(7)]
    for ticket in held:
        await crashed.admit(AGENT, RunInfo(run_id=uuid.uuid4().hex), ticket)
    survivor = make_meter()
    before = await survivor.usage(AGENT.agent_id, lim)
    assert (before.in_flight, before.reserved_tokens) == (7, 28_000)
    await survivor.start()  # the restart: the process that held them is gone
    after = await survivor.usage(AGENT.agent_id, lim)
    assert (after.in_flight, after.reserved_tokens) == (0, 0)
    for _ in range(12):
        await survivor.admit(AGENT, RunInfo(run_id=uuid.uuid4().hex), admission(lim))


async def test_a_live_replica_keeps_its_reservations_until_its_heartbeat_stops(
    make_meter: Callable[..., Meter],
) -> None:
    if isinstance(make_meter(), BufferedSqliteMeter):
        pytest.skip("several meters on one file: the buffered meter serves one process (tests/unit: its crash)")
    lim = limits(concurrent_calls=0)
    replica = make_meter(heartbeat_seconds=60, instance_timeout=1.0)  # same process: judged by heartbeat
    await replica.start()
    await replica.admit(AGENT, RunInfo(run_id="a"), admission(lim))
    other = make_meter(heartbeat_seconds=60, instance_timeout=1.0)
    await other.start()
    assert (await other.usage(AGENT.agent_id, lim)).in_flight == 1  # alive: kept
    await asyncio.sleep(1.3)  # no heartbeat from the replica since
    assert await other.reconcile() == (1, 10)  # type: ignore[attr-defined]
    assert (await other.usage(AGENT.agent_id, lim)).in_flight == 0


async def test_a_meter_that_closes_releases_what_it_still_holds(make_meter: Callable[..., Meter]) -> None:
    if isinstance(make_meter(), BufferedSqliteMeter):
        pytest.skip("several meters on one file: the buffered meter serves one process (tests/unit: its crash)")
    lim = limits()
    first = make_meter()
    await first.start()
    await first.admit(AGENT, RunInfo(run_id="a"), admission(lim))
    await first.close()
    second = make_meter()
    assert (await second.usage(AGENT.agent_id, lim)).in_flight == 0
