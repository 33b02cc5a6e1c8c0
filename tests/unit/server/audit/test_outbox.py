from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox
from server.audit.search import AuditQuery
from server.audit.stage import AuditStage, DenialRecorder, RecordStage
from server.errors import BackendUnavailable, Denied
from server.invoke import InvokeStage
from server.metrics import Metrics
from server.pipeline import Pipeline
from tests.fakes.backends import FakeTool, MemoryOutbox, allowed, make_call

pytestmark = pytest.mark.anyio
KEY = ChainKey.generate()


async def test_records_are_committed_and_read_back(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.write("decision", "c1", {"decision": "allow"})
    await outbox.write("outcome", "c1", {"is_error": False})
    assert await outbox.records("c1") == {"decision": {"decision": "allow"}, "outcome": {"is_error": False}}


async def test_a_record_is_stored_as_compact_json_with_other_values_as_their_str(tmp_path: Path) -> None:
    import json
    from datetime import UTC, datetime

    record = {"tool": "café ✓", "latency_ms": 1.5e-05, "n": 10**20, "at": datetime(2026, 1, 2, tzinfo=UTC),
              "nested": {"ids": ("a", 1, None, True), 3: -0.0}}  # fmt: skip
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.write("decision", "c1", record)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        (body,) = conn.execute("SELECT record FROM outbox").fetchone()
    assert body == json.dumps(record, separators=(",", ":"), default=str)  # the chain's MAC covers these bytes
    assert outbox.verify().intact
    assert (await outbox.records("c1"))["decision"]["n"] == 10**20  # read back exactly, an int (not orjson's 1e+20)
    assert type((await outbox.records("c1"))["decision"]["n"]) is int
    await outbox.close()


async def test_a_utf8_record_verifies_after_one_written_as_ascii_before(tmp_path: Path) -> None:
    """orjson writes non-ASCII characters as themselves; the MAC covers the stored text, whatever its
    bytes, so a chain mixing records written before (ASCII escapes) and after (UTF-8) verifies."""
    import json

    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.write("decision", "old", {"tool": "café", "at": (1,)})  # a tuple: Python's encoder, ASCII
    await outbox.write("decision", "new", {"tool": "café ✓", "latency_ms": 1.5e-05})
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        bodies = [r[0] for r in conn.execute("SELECT record FROM outbox ORDER BY seq")]
    assert bodies[0] == json.dumps({"tool": "café", "at": [1]}, separators=(",", ":"))
    assert "café ✓" in bodies[1]
    assert json.loads(bodies[1]) == {"tool": "café ✓", "latency_ms": 1.5e-05}
    assert (await outbox.records("new"))["decision"]["tool"] == "café ✓"
    assert outbox.verify().intact
    await outbox.close()


async def test_non_finite_numbers_are_written_as_standard_json_so_the_store_stays_queryable(tmp_path: Path) -> None:
    """A caller's `NaN`/`Infinity` (Python's parser accepts them) or an upstream's: written as strings.
    Written as Python writes them, one record made SQLite's JSON functions fail every query of the store
    (what is ready to ship, the backlog, the audit search)."""
    import json

    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    nasty = {"n": float("nan"), "big": float("inf"), "rows": [float("-inf"), 1.5], "ok": 2}
    await outbox.write("decision", "c1", {"decision": "deny", "arguments": nasty})
    await outbox.write("decision", "c2", {"decision": "deny", "arguments": {}})
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        assert conn.execute("SELECT count(*) FROM outbox WHERE json_valid(record)").fetchone() == (2,)
        (body,) = conn.execute("SELECT record FROM outbox WHERE call_id = 'c1'").fetchone()

    def refuse(token: str) -> None:
        raise ValueError(token)

    assert json.loads(body, parse_constant=refuse)["arguments"] == {
        "n": "NaN", "big": "Infinity", "rows": ["-Infinity", 1.5], "ok": 2,
    }  # fmt: skip
    assert len(await outbox.pending(10)) == 2
    assert (await outbox.backlog())[0] == 2
    assert [r["call_id"] for r in outbox.search(AuditQuery())] == ["c2", "c1"]
    assert outbox.verify().intact
    await outbox.close()


async def test_the_outbox_refuses_deletes(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.write("decision", "c1", {})
    conn = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM outbox")


async def test_a_record_cannot_be_written_twice(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
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


async def crashed_instance(tmp_path: Path) -> SqliteOutbox:
    """A writer that dies mid-call: its lock goes with the process (here: closed without `close()`)."""
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.start()
    await outbox.write("decision", "cut-off", {"decision": "allow", "agent_id": "a1"})
    await outbox.write("decision", "finished", {"decision": "allow"})
    await outbox.write("outcome", "finished", {"is_error": False})
    await outbox.write("decision", "denied", {"decision": "deny"})
    assert outbox.instances._fd is not None
    os.close(outbox.instances._fd)  # what the kernel does for a SIGKILLed process
    outbox.instances._fd = None
    return outbox


async def test_calls_a_crash_cut_off_are_closed_as_interrupted_at_the_next_start(tmp_path: Path) -> None:
    await crashed_instance(tmp_path)
    restarted = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    closed = await restarted.start()
    assert [d["agent_id"] for d in closed] == ["a1"]  # what it held can be released
    outcome = (await restarted.records("cut-off"))["outcome"]
    assert (outcome["is_error"], outcome["interrupted"], outcome["flags"]) == (True, True, ["interrupted"])
    assert [r["call_id"] for r in restarted.search(AuditQuery(outcome="interrupted"))] == ["cut-off"]
    assert [r["call_id"] for r in restarted.search(AuditQuery(outcome="ok"))] == ["finished"]
    result = restarted.verify()
    assert result.intact, result.breaks
    assert result.interrupted == ("cut-off",)
    assert await restarted.start() == []  # closed once
    await restarted.close()


async def test_calls_of_an_instance_that_still_runs_are_left_open(tmp_path: Path) -> None:
    running = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await running.start()
    await running.write("decision", "in-flight", {"decision": "allow"})
    other = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    assert await other.start() == []
    assert [r["call_id"] for r in other.search(AuditQuery(outcome="unfinished"))] == ["in-flight"]
    assert other.verify().unfinished == ("in-flight",)
    await running.close()
    await other.close()


async def test_readiness_writes_so_a_database_that_cannot_take_writes_is_not_ready(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.check()
    outbox._db.run_sync(lambda c: c.execute("PRAGMA query_only = 1"))  # reads still work, writes do not
    with pytest.raises(BackendUnavailable, match="audit log cannot write"):
        await outbox.check()
    await outbox.close()


async def test_an_outcome_that_cannot_be_written_is_owed_and_appended_once_writes_work(tmp_path: Path) -> None:
    """The fault suite's full disk: an allowed call's outcome failed to write, and nothing wrote it after
    space returned (its decision stayed open and unshipped until a restart called it interrupted)."""
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.write("decision", "ran", {"decision": "allow"})
    outbox._db.run_sync(lambda c: c.execute("PRAGMA query_only = 1"))  # the disk is full
    with pytest.raises(BackendUnavailable):
        await outbox.write("outcome", "ran", {"is_error": False})
    with pytest.raises(BackendUnavailable):  # the recorder's second word: the tool ran, then audit failed
        await outbox.write("outcome", "ran", {"is_error": False, "error": "the tool ran, then audit failed"})
    with pytest.raises(BackendUnavailable):
        await outbox.check()
    outbox._db.run_sync(lambda c: c.execute("PRAGMA query_only = 0"))  # space returns
    await outbox.check()  # a readiness probe that succeeds writes what is owed
    assert await outbox.records("ran") == {
        "decision": {"decision": "allow"},
        "outcome": {"is_error": False, "error": "the tool ran, then audit failed"},
    }
    await outbox.write("decision", "next", {"decision": "allow"})  # nothing is written twice
    rows = sqlite3.connect(tmp_path / "audit.db").execute("SELECT kind FROM outbox WHERE call_id = 'ran'").fetchall()
    assert sorted(rows) == [("decision",), ("outcome",)]
    await outbox.close()


async def test_a_version_2_outbox_loses_its_unused_index_and_keeps_its_records_guards_and_chain(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.write("decision", "c1", {"decision": "allow"})
    await outbox.close()
    conn = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    conn.execute("CREATE INDEX outbox_open ON outbox (kind, instance)")  # as version 2 left it
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    reopened = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await reopened.write("outcome", "c1", {"is_error": False})
    conn = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'outbox_open'").fetchall() == []
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM outbox")
    conn.close()
    assert set(await reopened.records("c1")) == {"decision", "outcome"}
    assert reopened.verify().intact
    await reopened.close()
