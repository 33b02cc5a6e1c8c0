"""A failure after the tool ran (the charge, the obligations, the outcome write) is never a denial."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from server.audit.stage import AuditStage, DenialRecorder, RecordStage
from server.call import Call
from server.errors import AfterInvoke, BackendUnavailable
from server.invoke import InvokeStage
from server.metering.retry import MeterRetries
from server.metering.sqlite import SqliteMeter
from server.metering.stage import AdmitStage, ChargeStage, ReleaseReservation
from server.metering.tokens import TokenCounter
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.policy.obligations import ObligationsStage
from server.protocol.tools import call_result
from server.registry import ToolOutput
from server.settings import Limits, MeterSettings
from tests.fakes.backends import FakeTool, MemoryMeter, MemoryOutbox, allowed, make_call

pytestmark = pytest.mark.anyio
COUNTER = TokenCounter()
SETTINGS = MeterSettings(limits=Limits(tokens_per_day=100_000), reserve_output_tokens=500)


class FlakyOutbox(MemoryOutbox):
    """Refuses the first `fail` outcome writes, as a locked or full audit database would."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail

    async def write(self, kind: Any, call_id: str, record: dict[str, Any]) -> None:
        if kind == "outcome" and self.fail > 0:
            self.fail -= 1
            raise BackendUnavailable("audit", "audit log unavailable: database is locked")
        await super().write(kind, call_id, record)


class BrokenObligations:
    name = "obligations"

    async def run(self, call: Call) -> Call:
        raise RuntimeError("a bug")


def pipeline(meter: Any, outbox: MemoryOutbox, retries: MeterRetries, obligations: Any = None) -> Pipeline:
    return Pipeline(
        [
            AdmitStage(meter, SETTINGS, COUNTER),
            RecordStage(outbox),
            InvokeStage(5.0),
            obligations or ObligationsStage(),
            ChargeStage(meter, COUNTER, retries),
            AuditStage(outbox),
        ],
        Metrics(),
        on_stop=[ReleaseReservation(meter, retries, COUNTER), DenialRecorder(outbox)],
    )


def result_body(call: Call) -> tuple[bool, str]:
    result = call_result(call)
    return bool(result.is_error), result.content[0].text  # type: ignore[union-attr]


class LockingTool(FakeTool):
    """A tool that, while it runs, has another process take the meters database's write lock."""

    def __init__(self, path: Path) -> None:
        super().__init__(result=ToolOutput(text="the tool's answer"))
        self.locker = sqlite3.connect(path, isolation_level=None, timeout=0)

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        self.locker.execute("BEGIN EXCLUSIVE")
        return await super().invoke(arguments)


async def test_a_locked_meter_after_the_tool_ran_returns_the_result_and_charges_later(tmp_path: Path) -> None:
    meter = SqliteMeter(tmp_path / "meters.db")
    outbox, retries = MemoryOutbox(), MeterRetries(meter, backoff_seconds=3600)  # retried by hand below
    tool = LockingTool(tmp_path / "meters.db")
    call = await pipeline(meter, outbox, retries).run(allowed(make_call(tool=tool)))
    tool.locker.execute("ROLLBACK")
    is_error, text = result_body(call)
    assert (is_error, text) == (False, "the tool's answer")  # the truth: it ran, here is its result
    assert isinstance(call.error, AfterInvoke)
    assert call.error.verdict == "allow"
    outcome = next(r for k, _, r in outbox.records if k == "outcome")
    assert "charging its" in outcome["error"]
    assert "owed" in outcome["error"]
    assert not outcome["is_error"]
    assert [k for k, _, _ in outbox.records] == ["decision", "outcome"]
    usage = await meter.usage("agent-1", SETTINGS.limits)
    assert usage.in_flight == 1  # the reservation stays held until the owed tokens are charged
    assert await retries.drain() == 0
    usage = await meter.usage("agent-1", SETTINGS.limits)
    day = next(w.used for w in usage.tokens if w.window == "day")
    assert (day, usage.in_flight) == (call.tokens_in + call.tokens_out, 0)
    await retries.close()
    await meter.close()


async def test_an_outcome_write_that_fails_still_returns_the_result_and_the_retry_records_it() -> None:
    meter, outbox = MemoryMeter(), FlakyOutbox(fail=1)
    call = await pipeline(meter, outbox, MeterRetries(meter)).run(allowed(make_call()))
    assert result_body(call) == (False, "ok")
    assert isinstance(call.error, AfterInvoke)
    assert call.error.stage == "audit"
    outcome = next(r for k, _, r in outbox.records if k == "outcome")
    assert outcome["error"] == (
        "the tool ran, then audit failed (audit log unavailable: database is locked): its result is returned"
    )
    assert meter.tokens["agent-1"] == call.tokens_in + call.tokens_out  # charged once, not released
    assert meter.reserved == {}


async def test_a_stage_that_shapes_the_result_failing_withholds_it_but_charges_the_call() -> None:
    meter, outbox = MemoryMeter(), MemoryOutbox()
    call = await pipeline(meter, outbox, MeterRetries(meter), BrokenObligations()).run(allowed(make_call()))
    is_error, text = result_body(call)
    body = json.loads(text)
    assert is_error
    assert body["decision"] == "allow"  # never "deny": the tool ran
    assert body["tool_ran"] is True
    assert (body["stage"], body["code"]) == ("obligations", "post_processing_failed")
    assert body["reasons"] == [
        "the tool ran, then obligations failed (internal error in obligations (RuntimeError)): its result is withheld"
    ]
    assert meter.tokens["agent-1"] == call.tokens_in + COUNTER.count("ok")  # what it used is charged
    assert meter.reserved == {}


async def test_a_call_stopped_before_its_tool_ran_is_still_released_not_charged() -> None:
    meter, outbox = MemoryMeter(), MemoryOutbox(down=True)
    call = await pipeline(meter, outbox, MeterRetries(meter)).run(allowed(make_call()))
    assert json.loads(result_body(call)[1])["decision"] == "deny"  # no audit row, no tool run
    assert meter.reserved == {}
    assert meter.tokens.get("agent-1", 0) == 0


async def test_a_release_that_fails_is_retried_when_the_store_returns() -> None:
    meter = MemoryMeter()
    retries = MeterRetries(meter, backoff_seconds=3600)
    call = await AdmitStage(meter, SETTINGS, COUNTER).run(make_call())

    async def refuse(identity: Any, reservation: str) -> None:
        raise BackendUnavailable("charge", "meter store unavailable")

    release = meter.release
    meter.release = refuse  # type: ignore[method-assign]
    await ReleaseReservation(meter, retries)(call)
    assert len(retries) == 1
    assert await retries.drain() == 1  # still down: kept
    meter.release = release  # type: ignore[method-assign]
    assert await retries.drain() == 0
    assert meter.reserved == {}


class LockThenDeny:
    """A policy stage that refuses the call while another process holds the meters' write lock."""

    name = "policy"

    def __init__(self, locker: sqlite3.Connection) -> None:
        self.locker = locker

    async def run(self, call: Call) -> Call:
        from server.errors import Denied

        self.locker.execute("BEGIN EXCLUSIVE")
        raise Denied("policy", "no")


async def test_a_release_refused_by_a_locked_meter_is_retried_not_leaked(tmp_path: Path) -> None:
    meter = SqliteMeter(tmp_path / "meters.db")
    retries = MeterRetries(meter, backoff_seconds=3600)
    locker = sqlite3.connect(tmp_path / "meters.db", isolation_level=None, timeout=0)
    stopped = Pipeline(
        [AdmitStage(meter, SETTINGS, COUNTER), LockThenDeny(locker)],
        Metrics(),
        on_stop=[ReleaseReservation(meter, retries, COUNTER)],
    )
    call = await stopped.run(make_call())
    assert call.error is not None
    assert call.error.verdict == "deny"
    locker.execute("ROLLBACK")
    assert len(retries) == 1  # kept, not dropped: before, it stayed held for the reservation's lifetime
    assert (await meter.usage("agent-1", SETTINGS.limits)).in_flight == 1
    assert await retries.drain() == 0
    assert (await meter.usage("agent-1", SETTINGS.limits)).in_flight == 0
    await retries.close()
    await meter.close()
