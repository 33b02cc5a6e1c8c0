"""A deferred outcome (`AuditStage(deferred=True)`) is built once the call is answered: the call returns
without it, it is the record built at once would be (its time the call's end), in the outbox after
the group commit, in order; one that cannot be built is logged, closes its call, and never reaches
the caller; `flush` builds what still waits (shutdown)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from server.audit import stage as audit_stage
from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox
from server.audit.records import outcome_record
from server.audit.redaction import Redactor
from server.audit.stage import AuditStage, RecordStage
from server.call import Call
from server.invoke import InvokeStage
from server.metrics import Metrics
from server.pipeline import Pipeline, Stage
from server.registry import ToolOutput
from tests.fakes.backends import FakeTool, MemoryOutbox, allowed, make_call

pytestmark = pytest.mark.anyio
KEY = ChainKey.generate()


def outcomes(outbox: MemoryOutbox) -> list[tuple[str, dict[str, Any]]]:
    return [(call_id, record) for kind, call_id, record in outbox.records if kind == "outcome"]


def pipeline(outbox: Any, *, then: tuple[Any, ...] = ()) -> Pipeline:
    return Pipeline([RecordStage(outbox), InvokeStage(5.0), AuditStage(outbox, deferred=True, then=then)], Metrics())


async def test_the_call_returns_before_its_outcome_is_built_and_then_it_is_the_same_record() -> None:
    outbox = MemoryOutbox()
    tool = FakeTool(result=ToolOutput(text="password=hunter2hunter2 and the rest"))
    call = await pipeline(outbox).run(allowed(make_call(tool=tool)))
    assert call.error is None
    answered = outcomes(outbox)  # what the outbox holds when the edge writes the response
    await asyncio.sleep(0)  # the loop's next turn
    assert answered == []
    [(call_id, record)] = outcomes(outbox)
    assert call_id == call.call_id
    # as built at the end of the call (the audit stage's own timing is the pipeline's, after it)
    at_once = outcome_record(call.evolve(timings=call.timings[:-1]), 0.0, Redactor())
    assert {**record, "latency_ms": None} == {**at_once, "latency_ms": None}
    assert "hunter2" not in str(record)  # redacted
    assert 0 <= record["latency_ms"] < 5_000


async def test_outcomes_are_built_in_the_order_of_their_calls() -> None:
    outbox = MemoryOutbox()
    run = pipeline(outbox).run
    calls = [await run(allowed(make_call())) for _ in range(3)]
    calls += await asyncio.gather(*(run(allowed(make_call())) for _ in range(3)))
    await asyncio.sleep(0)
    assert [call_id for call_id, _ in outcomes(outbox)] == [c.call_id for c in calls]


async def test_a_deferred_outcome_is_in_the_outbox_after_its_group_commit(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=0.05)
    await outbox.start()
    call = await pipeline(outbox).run(allowed(make_call()))
    for _ in range(100):  # bounded: the interval is 0.05 s
        await asyncio.sleep(0.02)
        with sqlite3.connect(outbox.path) as db:
            if db.execute("SELECT 1 FROM outbox WHERE kind = 'outcome'").fetchone():
                break
    records = await outbox.records(call.call_id)
    assert records["decision"]["decision"] == "allow"
    assert records["outcome"]["is_error"] is False
    assert records["outcome"]["result_preview"] == 'ok\n{"ok": true}'  # the fake tool's text and structure
    assert outbox.verify().intact
    await outbox.close()


async def test_an_outcome_that_cannot_be_built_is_logged_closes_its_call_and_never_reaches_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outbox = MemoryOutbox()

    def broken(call: Call, finished_at: float, redactor: Redactor | None = None) -> dict[str, Any]:
        raise ValueError("cannot summarise this result")

    monkeypatch.setattr(audit_stage, "outcome_record", broken)
    with capture_logs() as logged:
        call = await pipeline(outbox).run(allowed(make_call()))
        await asyncio.sleep(0)
    assert call.error is None  # the caller has its result
    assert call.output is not None
    assert call.output.text == "ok"
    [(call_id, record)] = outcomes(outbox)  # the call is closed, not left open until a restart
    assert call_id == call.call_id
    assert record["is_error"] is False
    assert record["error"] == "the outcome record could not be built (ValueError)"
    assert [e["call_id"] for e in logged if e["event"] == "outcome_record_failed"] == [call.call_id]


async def test_an_outcome_the_outbox_refuses_is_logged_and_the_next_ones_still_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outbox = MemoryOutbox()
    refused = [True]
    write_later = outbox.write_later

    def refuse_once(kind: Any, call_id: str, record: dict[str, Any]) -> None:
        if refused.pop() if refused else False:
            raise TypeError("not JSON")
        write_later(kind, call_id, record)

    monkeypatch.setattr(outbox, "write_later", refuse_once)
    run = pipeline(outbox).run
    with capture_logs() as logged:
        first = await run(allowed(make_call()))
        second = await run(allowed(make_call()))
        await asyncio.sleep(0)
    assert first.error is None
    assert second.error is None
    assert [call_id for call_id, _ in outcomes(outbox)] == [second.call_id]
    assert [e["call_id"] for e in logged if e["event"] == "audit_write_failed"] == [first.call_id]


async def test_flush_builds_the_outcomes_still_waiting_then_runs_what_follows() -> None:
    outbox = MemoryOutbox()
    followed: list[int] = []
    audit = AuditStage(outbox, deferred=True, then=(lambda: followed.append(len(outcomes(outbox))),))
    run = Pipeline([RecordStage(outbox), InvokeStage(5.0), audit], Metrics()).run
    calls = [await run(allowed(make_call())) for _ in range(2)]
    audit.flush()  # at shutdown: no turn of the loop in between
    assert [call_id for call_id, _ in outcomes(outbox)] == [c.call_id for c in calls]
    assert followed == [2]  # the decision log's waiting lines come after the outcomes
    await asyncio.sleep(0)  # the turn scheduled for them finds nothing left: each outcome once
    assert len(outcomes(outbox)) == 2


async def test_an_outcome_not_deferred_is_written_before_the_call_returns() -> None:
    outbox = MemoryOutbox()
    followed: list[int] = []
    stages: list[Stage] = [
        RecordStage(outbox),
        InvokeStage(5.0),
        AuditStage(outbox, then=(lambda: followed.append(1),)),
    ]
    call = await Pipeline(stages, Metrics()).run(allowed(make_call()))
    assert [call_id for call_id, _ in outcomes(outbox)] == [call.call_id]
    assert followed == []
    await asyncio.sleep(0)
    assert followed == [1]
