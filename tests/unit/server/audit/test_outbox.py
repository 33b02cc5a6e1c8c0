from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.audit.outbox import SqliteOutbox
from server.audit.stage import AuditStage, DenialRecorder, RecordStage
from server.errors import BackendUnavailable, Denied
from server.invoke import InvokeStage
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.testing import FakeTool, MemoryOutbox, allowed, make_call

pytestmark = pytest.mark.anyio


async def test_records_are_committed_and_read_back(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db")
    await outbox.write("decision", "c1", {"decision": "allow"})
    await outbox.write("outcome", "c1", {"is_error": False})
    assert await outbox.records("c1") == {"decision": {"decision": "allow"}, "outcome": {"is_error": False}}


async def test_the_outbox_refuses_deletes(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db")
    await outbox.write("decision", "c1", {})
    conn = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM outbox")


async def test_a_record_cannot_be_written_twice(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db")
    await outbox.write("decision", "c1", {})
    with pytest.raises(BackendUnavailable):
        await outbox.write("decision", "c1", {})


async def test_the_decision_is_recorded_before_the_tool_runs() -> None:
    outbox = MemoryOutbox()
    seen_when_run: list[list[str]] = []
    tool = FakeTool()
    original = tool.invoke

    async def spying(arguments: object) -> object:
        seen_when_run.append([k for k, _, _ in outbox.records])
        return await original(arguments)  # type: ignore[arg-type]

    tool.invoke = spying  # type: ignore[method-assign]
    pipeline = Pipeline([RecordStage(outbox), InvokeStage(5.0), AuditStage(outbox)], Metrics())
    call = await pipeline.run(allowed(make_call(tool=tool)))
    assert seen_when_run == [["decision"]]
    assert outbox.kinds(call.call_id) == ["decision", "outcome"]


async def test_no_tool_runs_when_its_decision_cannot_be_recorded() -> None:
    outbox = MemoryOutbox(down=True)
    tool = FakeTool()
    pipeline = Pipeline([RecordStage(outbox), InvokeStage(5.0)], Metrics(), on_stop=[DenialRecorder(outbox)])
    call = await pipeline.run(allowed(make_call(tool=tool)))
    assert tool.calls == []
    assert call.error is not None
    assert call.error.reasons == ("audit log unavailable",)


async def test_a_denial_is_recorded_with_stage_and_reasons() -> None:
    outbox = MemoryOutbox()

    class Deny:
        name = "policy"

        async def run(self, call: object) -> object:
            raise Denied("policy", "not on Sundays")

    call = await Pipeline([Deny()], Metrics(), on_stop=[DenialRecorder(outbox)]).run(make_call())  # type: ignore[list-item]
    ((kind, call_id, record),) = outbox.records
    assert (kind, call_id) == ("decision", call.call_id)
    assert (record["decision"], record["stage"], record["reasons"]) == ("deny", "policy", ["not on Sundays"])
    assert record["agent_id"] == "agent-1"
    assert record["arguments"] == {"q": "hello"}
