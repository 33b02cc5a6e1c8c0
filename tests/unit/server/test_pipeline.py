from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from server.call import Call
from server.errors import Denied, InternalError
from server.in_flight import WORKING
from server.metrics import Metrics
from server.pipeline import Pipeline
from tests.fakes.backends import make_call

pytestmark = pytest.mark.anyio


class Mark:
    def __init__(self, name: str, seen: list[str], fail: Exception | None = None) -> None:
        self.name, self.seen, self.fail = name, seen, fail

    async def run(self, call: Call) -> Call:
        self.seen.append(self.name)
        if self.fail is not None:
            raise self.fail
        return replace(call, request_id=call.request_id + self.name)


async def test_stages_run_in_order_and_each_adds_to_the_call() -> None:
    seen: list[str] = []
    pipeline = Pipeline([Mark("a", seen), Mark("b", seen), Mark("c", seen)], Metrics())
    call = await pipeline.run(make_call(request_id=""))
    assert seen == ["a", "b", "c"]
    assert call.request_id == "abc"
    assert [name for name, _ in call.timings] == ["a", "b", "c"]
    assert call.error is None


async def test_a_denial_stops_later_stages_and_is_recorded() -> None:
    seen: list[str] = []
    stopped: list[Call] = []

    async def on_stop(call: Call) -> None:
        stopped.append(call)

    pipeline = Pipeline(
        [Mark("a", seen), Mark("b", seen, Denied("b", "no")), Mark("c", seen)], Metrics(), on_stop=[on_stop]
    )
    call = await pipeline.run(make_call())
    assert seen == ["a", "b"]
    assert call.error is not None
    assert (call.error.stage, call.error.reasons) == ("b", ("no",))
    assert stopped == [call]
    assert not call.allowed


async def test_a_bug_in_a_stage_becomes_an_internal_error_never_an_allow() -> None:
    stopped: list[Call] = []

    async def on_stop(call: Call) -> None:
        stopped.append(call)

    pipeline = Pipeline([Mark("boom", [], KeyError("x"))], Metrics(), on_stop=[on_stop])
    call = await pipeline.run(make_call())
    assert isinstance(call.error, InternalError)
    assert call.error.reasons == ("internal error in boom (KeyError)",)
    assert not call.allowed
    assert len(stopped) == 1


async def test_stage_latency_lands_in_the_metrics() -> None:
    metrics = Metrics()
    await Pipeline([Mark("a", [])], metrics).run(make_call())
    assert b'castellan_stage_seconds_count{stage="a"} 1.0' in metrics.render()


class Counting:
    """Notes how many calls this thread's loop counts as worked on while it runs (server/in_flight)."""

    def __init__(self, name: str, counts: list[int], *, waits: bool = False, fail: Exception | None = None) -> None:
        self.name, self.counts, self.waits, self.fail = name, counts, waits, fail

    async def run(self, call: Call) -> Call:
        self.counts.append(WORKING.calls)
        if self.fail is not None:
            raise self.fail
        return call


async def test_a_call_counts_as_worked_on_except_while_a_stage_waits() -> None:
    counts: list[int] = []
    stages = [Counting("a", counts), Counting("invoke", counts, waits=True), Counting("b", counts)]
    await Pipeline(stages, Metrics()).run(make_call())
    assert counts == [1, 0, 1]  # the tool's wait is not work the loop does
    assert WORKING.calls == 0


async def test_calls_at_once_count_each_other_and_the_count_is_freed_after_a_refusal() -> None:
    gate = asyncio.Event()
    seen_by_second: list[int] = []

    class Held:
        name = "held"

        async def run(self, call: Call) -> Call:
            await gate.wait()  # the first call is still worked on (a commit, say) here
            return call

    first = asyncio.ensure_future(Pipeline([Held()], Metrics()).run(make_call()))
    await asyncio.sleep(0)
    refusing = Pipeline([Counting("a", seen_by_second, fail=Denied("a", "no"))], Metrics())
    refused = await refusing.run(make_call())
    assert seen_by_second == [2]  # the held call, and this one
    assert refused.error is not None
    assert WORKING.calls == 1  # the refused call is no longer counted; the held one is
    gate.set()
    await first
    assert WORKING.calls == 0


async def test_a_cancelled_call_is_no_longer_counted() -> None:
    class Forever:
        name = "forever"

        async def run(self, call: Call) -> Call:
            await asyncio.Event().wait()
            return call

    task = asyncio.ensure_future(Pipeline([Forever()], Metrics()).run(make_call()))
    await asyncio.sleep(0)
    assert WORKING.calls == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert WORKING.calls == 0
