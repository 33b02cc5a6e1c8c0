from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.call import RunInfo
from server.errors import BackendUnavailable, Denied
from server.metering.sqlite import SqliteMeter
from server.settings import Limits
from server.testing import make_identity

pytestmark = pytest.mark.anyio
AGENT = make_identity()


@pytest.fixture
def meter(tmp_path: Path) -> SqliteMeter:
    return SqliteMeter(tmp_path / "meters.db")


async def test_a_run_is_cut_off_at_exactly_the_maximum_number_of_calls(meter: SqliteMeter) -> None:
    limits = Limits(max_run_calls=5, max_repeats=0)
    run = RunInfo(run_id="r1")
    for i in range(5):
        budget = await meter.admit(AGENT, run, f"k{i}", limits)
        assert budget.run_calls == i + 1
    with pytest.raises(Denied, match="loop depth: run r1 reached the maximum of 5 tool calls"):
        await meter.admit(AGENT, run, "k5", limits)
    await meter.admit(AGENT, RunInfo(run_id="r2"), "k0", limits)  # another run is unaffected


async def test_the_same_call_repeated_is_denied_as_a_loop_with_the_count(meter: SqliteMeter) -> None:
    limits = Limits(max_repeats=3)
    run = RunInfo(run_id="r1")
    for _ in range(3):
        await meter.admit(AGENT, run, "same", limits)
    with pytest.raises(Denied, match="the same tool and arguments 4 times in run r1"):
        await meter.admit(AGENT, run, "same", limits)
    await meter.admit(AGENT, run, "different", limits)


async def test_calls_per_minute_are_limited_with_retry_after(meter: SqliteMeter) -> None:
    limits = Limits(calls_per_minute=2, max_repeats=0)
    await meter.admit(AGENT, RunInfo(run_id="a"), "k", limits)
    await meter.admit(AGENT, RunInfo(run_id="b"), "k", limits)
    with pytest.raises(Denied, match=r"rate limit: 2 calls per minute reached \(retry_after=\d+s\)"):
        await meter.admit(AGENT, RunInfo(run_id="c"), "k", limits)


async def test_charged_tokens_exhaust_the_daily_budget(meter: SqliteMeter) -> None:
    limits = Limits(tokens_per_day=100)
    budget = await meter.admit(AGENT, RunInfo(run_id="a"), "k", limits)
    assert (budget.tokens_used, budget.tokens_limit) == (0, 100)
    await meter.charge(AGENT, 100)
    with pytest.raises(Denied, match="token budget: 100 of 100 tokens per day used"):
        await meter.admit(AGENT, RunInfo(run_id="b"), "k", limits)


async def test_limits_are_per_agent(meter: SqliteMeter) -> None:
    limits = Limits(tokens_per_day=10)
    await meter.charge(AGENT, 10)
    await meter.admit(make_identity(agent_id="agent-2"), RunInfo(run_id="a"), "k", limits)


async def test_concurrent_admissions_never_exceed_the_limit(meter: SqliteMeter) -> None:
    limits = Limits(calls_per_minute=10, max_repeats=0)

    async def one(i: int) -> bool:
        try:
            await meter.admit(AGENT, RunInfo(run_id=f"r{i}"), "k", limits)
            return True
        except Denied:
            return False

    results = await asyncio.gather(*(one(i) for i in range(64)))
    assert sum(results) == 10


async def test_an_unusable_store_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "meters.db").mkdir()
    meter = SqliteMeter(tmp_path / "meters.db")
    with pytest.raises(BackendUnavailable, match="meter store unavailable"):
        await meter.admit(AGENT, RunInfo(run_id="a"), "k", Limits())
