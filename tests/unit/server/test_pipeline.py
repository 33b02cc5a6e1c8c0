from __future__ import annotations

from dataclasses import replace

import pytest

from server.call import Call
from server.errors import Denied, InternalError
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
