from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from server.audit.chain import record_mac
from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox
from server.audit.search import AuditQuery, render

pytestmark = pytest.mark.anyio
KEY = ChainKey.generate()


async def filled(tmp_path: Path, n: int = 8) -> SqliteOutbox:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await asyncio.gather(
        *(
            outbox.write(
                "decision",
                f"c{i}",
                {
                    "agent_id": f"a{i % 2}",
                    "tool": "echo",
                    "decision": "allow" if i % 3 else "deny",
                    "reasons": ["too long"] if i % 3 == 0 else [],
                    "run_id": "r1",
                },
            )
            for i in range(n)
        )
    )
    return outbox


def tamper(tmp_path: Path, *sql: str) -> None:
    """What an intruder with the database file can do: drop the guards, then change history."""
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.execute("DROP TRIGGER outbox_no_update")
    conn.execute("DROP TRIGGER outbox_no_delete")
    for statement in sql:
        conn.execute(statement)
    conn.commit()


async def test_concurrent_writes_form_an_intact_chain(tmp_path: Path) -> None:
    outbox = await filled(tmp_path, 50)
    result = outbox.verify()
    assert (result.records, result.intact) == (50, True)


async def test_the_guards_refuse_edits_and_deletes(tmp_path: Path) -> None:
    await filled(tmp_path, 2)
    conn = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="cannot be changed"):
        conn.execute("UPDATE outbox SET record = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM outbox WHERE seq = 1")
    conn.execute("UPDATE outbox SET shipped_at = 1.0 WHERE seq = 1")  # the shipper may mark rows shipped


async def test_an_edited_record_is_reported_at_its_position(tmp_path: Path) -> None:
    outbox = await filled(tmp_path)
    tamper(tmp_path, """UPDATE outbox SET record = replace(record, '"deny"', '"allow"') WHERE seq = 4""")
    result = outbox.verify()
    assert [(b.seq, b.problem) for b in result.breaks] == [(4, "its content does not match its hash (edited)")]


async def test_a_deleted_record_is_reported(tmp_path: Path) -> None:
    outbox = await filled(tmp_path)
    tamper(tmp_path, "DELETE FROM outbox WHERE seq = 5")
    problems = {(b.seq, b.problem) for b in outbox.verify().breaks}
    assert (6, "records 5..5 are missing (deleted)") in problems
    assert (6, "does not follow the record before it (a record was deleted or reordered)") in problems


async def test_swapped_records_are_reported(tmp_path: Path) -> None:
    outbox = await filled(tmp_path)
    tamper(
        tmp_path,
        "UPDATE outbox SET seq = -2 WHERE seq = 2",
        "UPDATE outbox SET seq = 2 WHERE seq = 3",
        "UPDATE outbox SET seq = 3 WHERE seq = -2",
    )
    assert {b.seq for b in outbox.verify().breaks} == {2, 3, 4}


async def test_a_cut_off_tail_is_caught_by_a_recorded_head(tmp_path: Path) -> None:
    outbox = await filled(tmp_path)
    assert outbox.record_head()[0] == 8
    tamper(tmp_path, "DELETE FROM outbox WHERE seq >= 7")
    problems = [(b.seq, b.problem) for b in outbox.verify().breaks]
    assert len(problems) == 1
    assert problems[0][0] == 7
    assert problems[0][1].startswith("records 7..8 are missing: the chain ends before the head checkpoint at record 8")
    assert problems[0][1].endswith("(tail cut off)")


async def test_search_filters_and_formats(tmp_path: Path) -> None:
    outbox = await filled(tmp_path, 9)
    denied = outbox.search(AuditQuery(decision="deny"))
    assert [r["call_id"] for r in denied] == ["c6", "c3", "c0"]  # newest first
    assert [r["call_id"] for r in outbox.search(AuditQuery(agent="a1", reason="too long"))] == ["c3"]
    assert [r["call_id"] for r in outbox.search(AuditQuery(limit=2, offset=1))] == ["c7", "c6"]
    assert render(denied, "csv").splitlines()[0].startswith("time,agent_id,tool,decision")
    assert len(render(denied, "jsonl").splitlines()) == 3
    assert "c3" in render(denied, "table")
    assert outbox.show("c3")["decision"]["seq"] >= 1  # type: ignore[index]
    assert outbox.show("nope") is None


@pytest.mark.parametrize(
    ("record", "instance"),
    [
        ('{"tool":"echo","arguments":{"text":"h\\u00e9 \\"quoted\\"\\n"}}', "3f2a9c0d1e4b5a6f"),
        ('é ü \u2028 \x00\x1f "\\ tab\t', None),
        ("", "é"),
    ],
)
def test_a_record_mac_is_the_hmac_of_its_fields_as_compact_json(record: str, instance: str | None) -> None:
    # The chain's format: what existing databases were written with and what `verify` recomputes.
    fields = ["castellan-audit-record-v2", KEY.key_id, "ab" * 32, 4711, 'c-"é', "outcome", repr(1.7e9 + 0.125), record]
    expected = KEY.mac(json.dumps([*fields, instance], separators=(",", ":")).encode())
    assert record_mac(KEY, "ab" * 32, 4711, 'c-"é', "outcome", 1.7e9 + 0.125, record, instance) == expected
    other = ChainKey.generate()
    assert record_mac(other, "ab" * 32, 4711, 'c-"é', "outcome", 1.7e9 + 0.125, record, instance) != expected
