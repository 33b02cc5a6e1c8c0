"""The console's index answers every filter exactly as the outbox's own search does, and follows the
outbox: new records, retention, a replaced outbox."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox, interrupted_outcome
from server.audit.records import decision_record, outcome_record
from server.audit.search import AuditQuery
from server.call import RunInfo
from server.console.index import GRAINS, ConsoleIndex
from server.errors import BackendUnavailable, Denied
from server.registry import ToolOutput
from tests.fakes.backends import allowed, make_call, make_identity

pytestmark = pytest.mark.anyio
AGENTS = ["alpha", "beta", "gamma"]
TOOLS = ["echo", "sql.query", "docs.search"]


async def fill(outbox: SqliteOutbox, count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    verdicts = random.Random(seed + 1)  # what a shadow policy said, if one decided (its own stream)
    ids = []
    for i in range(count):
        groups = tuple(rng.sample(["analysts", "ops", "finance"], rng.randint(0, 2)))
        identity = make_identity(agent_id=rng.choice(AGENTS), subject=rng.choice(["ann", "bob"]), groups=groups)
        call = allowed(make_call(tool_name=rng.choice(TOOLS), identity=identity, run=RunInfo(run_id=f"run-{i % 5}"),
                                 action=rng.choice(["call", "call", "llm"])))  # fmt: skip
        call = replace(call, decision=replace(call.decision, policy_version=f"v{i // 20}"))  # type: ignore[arg-type]
        fate = rng.random()
        if fate < 0.2:
            call = replace(call, error=Denied(rng.choice(["policy", "grants"]), f"reason {rng.randint(0, 3)}"))
        elif fate < 0.25:
            call = replace(call, error=BackendUnavailable("policy", "engine down"))
        shadow = _verdict(verdicts, f"cand-{i // 30}")
        if shadow is not None and call.error is not None:  # a refusal's shadow verdict is in its decision record
            call = replace(call, decision=replace(call.decision, allow=False, shadow=shadow))  # type: ignore[arg-type]
        elif shadow is not None:  # an allowed call's in its outcome record
            call = replace(call, shadow=shadow)
        await outbox.write("decision", call.call_id, decision_record(call))
        if call.error is None:
            if fate < 0.3:
                await outbox.write("outcome", call.call_id, interrupted_outcome(call.call_id, "x", "y"))
            elif fate < 0.35:
                pass  # unfinished
            else:
                output = ToolOutput(text="ok", is_error=fate > 0.9)
                await outbox.write("outcome", call.call_id, outcome_record(replace(call, output=output), time.time()))
        ids.append(call.call_id)
    return ids


def _verdict(rng: random.Random, version: str) -> dict[str, object] | None:
    change = rng.choice([None, None, "agree", "agree", "allow_to_deny", "deny_to_allow", "obligations", "error"])
    if change is None:
        return None
    if change == "error":
        return {"error": "timed out", "differs": False, "policy_version": version}
    differs = change != "agree"
    return {"allow": True, "reasons": [], "obligations": {}, "policy_version": version, "differs": differs,
            "change": change if differs else None}  # fmt: skip


@pytest.fixture
async def outbox(tmp_path: Path) -> SqliteOutbox:
    box = SqliteOutbox(tmp_path / "audit.db", key=ChainKey.generate(), checkpoint_seconds=0)
    yield box  # type: ignore[misc]
    await box.close()


QUERIES = [
    AuditQuery(),
    AuditQuery(agent="alpha"),
    AuditQuery(agent="alpha", decision="deny"),
    AuditQuery(subject="bob", tool="echo"),
    AuditQuery(group="ops"),
    AuditQuery(group="finance", decision="allow"),
    AuditQuery(stage="grants"),
    AuditQuery(decision="error"),
    AuditQuery(policy_version="v2"),
    AuditQuery(run_id="run-3"),
    AuditQuery(reason="reason 2"),
    AuditQuery(reason="REASON"),
    AuditQuery(flag="interrupted"),
    *(AuditQuery(outcome=o) for o in ("ok", "error", "interrupted", "unfinished")),
    AuditQuery(agent="nobody"),
    AuditQuery(shadow_diff=True),
    AuditQuery(shadow_diff=True, decision="deny"),
    AuditQuery(limit=7, offset=5),
    AuditQuery(agent="beta", limit=3, offset=2),
]


async def test_every_filter_finds_exactly_what_the_outbox_search_finds(outbox: SqliteOutbox, tmp_path: Path) -> None:
    await fill(outbox, 120)
    index = ConsoleIndex(tmp_path / "index.db", outbox.path, batch=17)  # small batches: many steps
    try:
        state = await index.refresh()
        assert state.behind == 0
        assert state.calls == 120
        mid = (await index.search(AuditQuery(limit=1, offset=60)))[0]["ts"]
        since = datetime.fromtimestamp(mid, UTC).isoformat()
        for query in [*QUERIES, AuditQuery(since=since), AuditQuery(until=since, agent="gamma")]:
            expected = [r["call_id"] for r in outbox.search(query)]
            got = [r["call_id"] for r in await index.search(query)]
            assert got == expected, query
        assert sum(1 for q in QUERIES if [r for r in outbox.search(q)]) > 15  # the filters select something
    finally:
        index.close()


async def test_new_records_and_late_outcomes_are_picked_up(outbox: SqliteOutbox, tmp_path: Path) -> None:
    index = ConsoleIndex(tmp_path / "index.db", outbox.path)
    try:
        assert (await index.refresh()).calls == 0
        call = allowed(make_call())
        await outbox.write("decision", call.call_id, decision_record(call))
        await index.refresh()
        assert [r["call_id"] for r in await index.search(AuditQuery(outcome="unfinished"))] == [call.call_id]
        await outbox.write("outcome", call.call_id, outcome_record(replace(call, output=ToolOutput(text="x")), 0))
        await index.refresh()
        assert [r["call_id"] for r in await index.search(AuditQuery(outcome="ok"))] == [call.call_id]
    finally:
        index.close()


async def test_calls_removed_by_retention_leave_the_index(outbox: SqliteOutbox, tmp_path: Path) -> None:
    ids = await fill(outbox, 30)
    index = ConsoleIndex(tmp_path / "index.db", outbox.path)
    try:
        await index.refresh()
        await outbox.mark_shipped(list(range(1, 200)))
        assert await outbox.prune(0) > 0
        await index.refresh()
        expected = [r["call_id"] for r in outbox.search(AuditQuery(limit=1000))]
        assert [r["call_id"] for r in await index.search(AuditQuery(limit=1000))] == expected
        assert len(expected) < len(ids)
    finally:
        index.close()


async def test_a_corrupt_index_file_is_rebuilt_from_the_outbox(outbox: SqliteOutbox, tmp_path: Path) -> None:
    await fill(outbox, 10)
    path = tmp_path / "index.db"
    path.write_bytes(b"this is not a database" * 100)
    index = ConsoleIndex(path, outbox.path)
    try:
        assert (await index.refresh()).calls == 10
    finally:
        index.close()


async def test_a_replaced_outbox_replaces_the_index(outbox: SqliteOutbox, tmp_path: Path) -> None:
    await fill(outbox, 10)
    index = ConsoleIndex(tmp_path / "index.db", outbox.path)
    await index.refresh()
    index.close()
    other = SqliteOutbox(tmp_path / "other.db", key=ChainKey.generate(), checkpoint_seconds=0)
    fresh = await fill(other, 3, seed=1)
    await other.close()
    _replace_file(tmp_path / "other.db", outbox.path)
    index = ConsoleIndex(tmp_path / "index.db", outbox.path)
    try:
        await index.refresh()
        assert sorted(r["call_id"] for r in await index.search(AuditQuery())) == sorted(fresh)
    finally:
        index.close()


def _replace_file(source: Path, target: Path) -> None:
    target.unlink()
    source.rename(target)
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)


def test_the_index_never_writes_to_the_outbox(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, call_id, kind, ts, record, prev_hash, hash)")
    conn.close()
    index = ConsoleIndex(tmp_path / "index.db", tmp_path / "audit.db")
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            index.run_sync(lambda c: c.execute("DELETE FROM audit.outbox"))
    finally:
        index.close()


def _summaries_and_direct(conn: sqlite3.Connection) -> list[tuple[set[tuple[object, ...]], set[tuple[object, ...]]]]:
    """Each chart summary as kept, and as computed directly from the index's calls."""
    pairs = [
        *((f"SELECT t, tool, n FROM tool_{grain}",
           f"SELECT CAST(ts / {seconds} AS INTEGER), COALESCE(tool, ''), COUNT(*) FROM calls GROUP BY 1, 2")
          for grain, seconds in GRAINS.items()),
        *((f"SELECT t, stage, n FROM denial_{grain}",
           f"SELECT CAST(ts / {seconds} AS INTEGER), COALESCE(NULLIF(stage, ''), decision), COUNT(*) FROM calls"
           " WHERE decision != 'allow' GROUP BY 1, 2")
          for grain, seconds in GRAINS.items()),
        ("SELECT slot, policy_version, decision, n FROM slot_policy",
         "SELECT CAST(ts / 900 AS INTEGER), policy_version, decision, COUNT(*) FROM calls"
         " WHERE policy_version IS NOT NULL AND policy_version != '' GROUP BY 1, 2, 3"),
        ("SELECT hour, agent, calls, tokens FROM hour_agent",
         "SELECT CAST(ts / 3600 AS INTEGER), agent, COUNT(*), SUM(COALESCE(tokens, 0)) FROM calls"
         " WHERE agent IS NOT NULL GROUP BY 1, 2"),
        ("SELECT slot, policy_version, shadow_version, change, n FROM slot_shadow",
         "SELECT CAST(ts / 900 AS INTEGER), COALESCE(policy_version, ''), COALESCE(shadow_version, ''), shadow,"
         " COUNT(*) FROM calls WHERE shadow IS NOT NULL GROUP BY 1, 2, 3, 4"),
        ("SELECT hour, reason, n FROM hour_reason",
         "SELECT CAST(c.ts / 3600 AS INTEGER), j.value, COUNT(*) FROM calls c, json_each(c.reasons) j"
         " WHERE c.decision != 'allow' GROUP BY 1, 2"),
    ]  # fmt: skip
    return [(set(conn.execute(kept).fetchall()), set(conn.execute(direct).fetchall())) for kept, direct in pairs]


async def test_the_chart_summaries_equal_the_calls_they_summarise_through_retention(
    outbox: SqliteOutbox, tmp_path: Path
) -> None:
    await fill(outbox, 90)
    index = ConsoleIndex(tmp_path / "index.db", outbox.path, batch=13)  # outcomes often a step after decisions
    try:
        await index.refresh()
        for kept, direct in await index.run(_summaries_and_direct):
            assert kept == direct
        await outbox.mark_shipped(list(range(1, 100)))
        assert await outbox.prune(0) > 0
        await fill(outbox, 20, seed=3)
        await index.refresh()
        for kept, direct in await index.run(_summaries_and_direct):
            assert kept == direct
    finally:
        index.close()


def test_a_filter_the_index_does_not_hold_is_refused_not_dropped() -> None:
    from server.console.index import where_clause

    @dataclasses.dataclass(frozen=True)
    class Wider(AuditQuery):  # a filter added to the audit search that the index has no column for
        colour: str | None = None

    with pytest.raises(ValueError, match="cannot filter by colour"):
        where_clause(Wider(colour="red"))
    where, _ = where_clause(AuditQuery(shadow_diff=True))  # held since the index keeps the shadow verdict
    assert "c.shadow IN" in where
