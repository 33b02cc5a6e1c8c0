"""Outcomes written off the response path: group-committed within the bounded interval, owed when the
write fails, committed at shutdown, and closed as `interrupted` when a crash comes first."""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from pathlib import Path

import pytest

from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox
from server.audit.stage import AuditStage, RecordStage
from server.invoke import InvokeStage
from server.metrics import Metrics
from server.pipeline import Pipeline
from tests.fakes.backends import FakeTool, allowed, make_call

pytestmark = pytest.mark.anyio
KEY = ChainKey.generate()


def committed(path: Path) -> dict[str, set[str]]:
    """What another process reading the file sees: call ids by kind."""
    conn = sqlite3.connect(path)
    try:
        found: dict[str, set[str]] = {"decision": set(), "outcome": set()}
        for call_id, kind in conn.execute("SELECT call_id, kind FROM outbox"):
            found[kind].add(call_id)
        return found
    finally:
        conn.close()


async def test_an_outcome_is_committed_within_the_interval_without_the_call_waiting_for_it(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=0.3)
    await outbox.write("decision", "c1", {"decision": "allow"})
    outbox.write_later("outcome", "c1", {"is_error": False})
    assert committed(outbox.path)["outcome"] == set()  # not yet: the call returned without waiting
    for _ in range(100):  # bounded: the interval is 0.3 s
        await asyncio.sleep(0.05)
        if committed(outbox.path)["outcome"]:
            break
    assert committed(outbox.path)["outcome"] == {"c1"}
    assert outbox.verify().intact
    await outbox.close()


async def test_a_decision_commit_takes_the_waiting_outcomes_with_it(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=60)
    await outbox.write("decision", "c1", {"decision": "allow"})
    outbox.write_later("outcome", "c1", {"is_error": False})
    await outbox.write("decision", "c2", {"decision": "allow"})  # one transaction, one fsync, for both
    assert committed(outbox.path) == {"decision": {"c1", "c2"}, "outcome": {"c1"}}
    await outbox.close()


async def test_outcomes_waiting_at_shutdown_are_committed_and_the_chain_verifies(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=60)
    await outbox.start()
    for i in range(50):
        await outbox.write("decision", f"c{i}", {"decision": "allow"})
        outbox.write_later("outcome", f"c{i}", {"is_error": False})
    await outbox.close()
    assert committed(outbox.path)["outcome"] == {f"c{i}" for i in range(50)}
    reopened = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    result = reopened.verify()
    assert result.intact, result.breaks
    assert result.unfinished == ()
    await reopened.close()


async def test_a_crash_inside_the_interval_loses_no_decision_and_its_calls_are_interrupted(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=60)
    await outbox.start()
    tool = FakeTool()
    pipeline = Pipeline([RecordStage(outbox), InvokeStage(5.0), AuditStage(outbox, deferred=True)], Metrics())
    calls = [await pipeline.run(allowed(make_call(tool=tool))) for _ in range(5)]
    assert all(c.error is None for c in calls)
    assert len(tool.calls) == 5
    # SIGKILL: the process's lock goes with it, and nothing waiting for its group commit is written.
    assert outbox.instances._fd is not None
    os.close(outbox.instances._fd)
    outbox.instances._fd = None
    outbox._db._deferred.clear()
    restarted = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    closed = {d["call_id"] for d in await restarted.start()}
    assert calls[-1].call_id in closed  # its outcome was waiting for the next commit
    for call in calls:  # every decision was durable; each call has its own outcome or `interrupted`
        records = await restarted.records(call.call_id)
        assert records["decision"]["decision"] == "allow"
        assert records["outcome"].get("interrupted", False) is (call.call_id in closed)
    result = restarted.verify()
    assert result.intact, result.breaks
    assert set(result.interrupted) == closed
    assert result.unfinished == ()
    await restarted.close()


async def test_an_outcome_whose_group_commit_fails_is_owed_and_written_by_the_next_write(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=0.0)
    await outbox.write("decision", "c1", {"decision": "allow"})
    outbox._db.run_sync(lambda c: c.execute("PRAGMA query_only = 1"))  # a disk that refuses writes
    outbox.write_later("outcome", "c1", {"is_error": False})
    for _ in range(100):
        await asyncio.sleep(0.01)
        if outbox._owed:
            break
    assert list(outbox._owed) == ["c1"]
    outbox._db.run_sync(lambda c: c.execute("PRAGMA query_only = 0"))
    await outbox.write("decision", "c2", {"decision": "allow"})
    assert outbox._owed == {}
    assert committed(outbox.path)["outcome"] == {"c1"}
    await outbox.close()


async def test_records_of_one_group_commit_chain_one_to_the_next_around_one_that_fails(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY, outcome_commit_seconds=60)
    await outbox.write("decision", "c1", {"decision": "allow"})
    await outbox.write("decision", "c2", {"decision": "allow"})
    outbox.write_later("outcome", "c1", {"is_error": False})
    outbox.write_later("outcome", "c1", {"is_error": True})  # a second outcome of c1: refused, owed
    outbox.write_later("outcome", "c2", {"is_error": False})
    await outbox.write("decision", "c3", {"decision": "allow"})  # one transaction for all four
    await asyncio.sleep(0)
    assert committed(outbox.path) == {"decision": {"c1", "c2", "c3"}, "outcome": {"c1", "c2"}}
    assert list(outbox._owed) == ["c1"]
    conn = sqlite3.connect(outbox.path)
    rows = conn.execute("SELECT seq, prev_hash, hash FROM outbox ORDER BY seq").fetchall()
    conn.close()
    assert [seq for seq, _, _ in rows] == [1, 2, 3, 4, 5]
    assert all(prev == before[2] for before, (_, prev, _) in itertools.pairwise(rows))
    assert outbox.verify().intact
    await outbox.close()
