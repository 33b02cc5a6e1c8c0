"""What an intruder with write access to the audit database (and the checkpoint file beside it) tries,
and what `verify` reports: rewrite-and-rehash, renumbering, forged checkpoints, a cut tail, retention."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from server.audit.chain import record_hash, record_mac
from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox

pytestmark = pytest.mark.anyio
KEY = ChainKey.generate()


async def written(tmp_path: Path, n: int, *, checkpoint_every: int = 4, key: ChainKey = KEY) -> SqliteOutbox:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=key)
    for i in range(1, n + 1):
        await outbox.write("decision", f"c{i}", {"decision": "deny" if i % 3 == 0 else "allow", "i": i})
        if i % checkpoint_every == 0:
            outbox.record_head()
    return outbox


def db(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS outbox_no_update")
    conn.execute("DROP TRIGGER IF EXISTS outbox_no_delete")
    return conn


def rehash_from(conn: sqlite3.Connection, first: int, key: ChainKey | None) -> None:
    """Recompute every hash from `first` on, as an intruder would: with the key if stolen, else SHA-256."""
    rows = conn.execute(
        "SELECT seq, call_id, kind, ts, record, instance FROM outbox WHERE seq >= ? ORDER BY seq", (first,)
    ).fetchall()
    prev = conn.execute("SELECT hash FROM outbox WHERE seq = ?", (first - 1,)).fetchone()[0]
    for seq, call_id, kind, ts, record, instance in rows:
        if key is None:
            digest = record_hash(prev, seq, call_id, kind, ts, record)
        else:
            digest = record_mac(key, prev, seq, call_id, kind, ts, record, instance)
        conn.execute("UPDATE outbox SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        conn.execute("UPDATE chain_heads SET hash = ? WHERE seq = ?", (digest, seq))  # heads are in the same file
        prev = digest


def problems(outbox: SqliteOutbox, **kwargs: object) -> list[tuple[int, str]]:
    return [(b.seq, b.problem) for b in outbox.verify(**kwargs).breaks]  # type: ignore[arg-type]


async def test_an_untouched_chain_verifies_against_its_checkpoints(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 12)
    result = outbox.verify()
    assert result.intact, result.breaks
    assert (result.records, result.checkpoints, result.last_checkpoint) == (12, 3, 12)


async def test_rewrite_and_rehash_without_the_key_is_reported_at_each_record(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 8)
    conn = db(tmp_path)
    conn.execute("""UPDATE outbox SET record = replace(record, '"deny"', '"allow"') WHERE seq = 6""")
    rehash_from(conn, 6, key=None)
    found = problems(outbox)
    assert (6, "rehashed without the chain key (rewritten and rehashed: forged)") in found
    assert {seq for seq, _ in found} == {6, 7, 8}


async def test_rewrite_and_rehash_with_a_stolen_key_is_caught_by_the_next_checkpoint(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 8)
    conn = db(tmp_path)
    conn.execute("""UPDATE outbox SET record = replace(record, '"deny"', '"allow"') WHERE seq = 3""")
    rehash_from(conn, 3, key=KEY)
    found = problems(outbox)
    assert [seq for seq, _ in found] == [4, 8]  # the checkpoints after the rewrite
    assert all("does not match the head checkpoint at record" in p for _, p in found)
    assert all(p.endswith("(rewritten and rehashed after it was checkpointed)") for _, p in found)


async def test_a_record_rewritten_with_another_key_reads_as_edited(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 5)
    conn = db(tmp_path)
    rehash_from(conn, 5, key=ChainKey(KEY.secret[:-1] + b"x"))
    assert (5, "its content does not match its hash (edited)") in problems(outbox)


async def test_deleting_a_record_and_renumbering_the_rest_is_reported_as_renumbered(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 8)
    conn = db(tmp_path)
    conn.execute("DELETE FROM outbox WHERE seq = 5")
    for seq in (6, 7, 8):
        conn.execute("UPDATE outbox SET seq = ? WHERE seq = ?", (seq - 1, seq))
    found = problems(outbox)
    assert (5, "records 5..5 are missing (deleted, then renumbered)") in found
    assert (5, "renumbered: this record was written as record 6") in found
    assert (6, "renumbered: this record was written as record 7") in found
    assert (7, "renumbered: this record was written as record 8") in found
    assert any(seq == 7 and "names is now at 7 (renumbered)" in p for seq, p in found)


async def test_a_cut_tail_is_reported_after_a_crash_without_a_shutdown_head(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 8)  # the periodic checkpoint saw record 8; no close()
    db(tmp_path).execute("DELETE FROM outbox WHERE seq >= 6")
    ((seq, problem),) = problems(outbox)
    assert seq == 6
    assert problem.startswith("records 6..8 are missing: the chain ends before the head checkpoint at record 8")


async def test_an_expected_head_catches_a_cut_tail_when_the_checkpoint_file_was_cut_too(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 8)
    head = outbox.verify().head
    lines = outbox.checkpoints.path.read_text().splitlines()
    outbox.checkpoints.path.write_text(lines[0] + "\n")  # only the checkpoint at 4 is left
    db(tmp_path).execute("DELETE FROM outbox WHERE seq >= 6")
    assert outbox.verify().intact  # what is left agrees with itself: only a head kept elsewhere shows the cut
    found = problems(outbox, expected_heads=[(8, head)])
    assert any(seq == 6 and "expected head 8:" in p and "(tail cut off)" in p for seq, p in found)


async def test_a_forged_or_edited_checkpoint_is_reported(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 4)
    line = json.loads(outbox.checkpoints.path.read_text().splitlines()[-1])
    line["seq"], line["head"] = 2, "f" * 64  # an intruder without the key, moving a checkpoint
    with outbox.checkpoints.path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.write("not json\n")
    found = problems(outbox)
    assert any(seq == 2 and "is not signed by the chain key (forged or edited)" in p for seq, p in found)
    assert any("line 3 is not a checkpoint" in p for _, p in found)


OLD_SCHEMA = """
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, call_id TEXT NOT NULL, kind TEXT NOT NULL,
  ts REAL NOT NULL, record TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, shipped_at REAL,
  UNIQUE (call_id, kind));
CREATE TABLE chain_heads (seq INTEGER PRIMARY KEY, hash TEXT NOT NULL, recorded_at REAL NOT NULL);
CREATE TRIGGER outbox_no_delete BEFORE DELETE ON outbox
BEGIN SELECT RAISE(ABORT, 'the audit outbox is append-only'); END;
"""


def unkeyed_outbox(path: Path, n: int) -> None:
    """An outbox as the previous version wrote it: a plain SHA-256 chain."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(OLD_SCHEMA)
    prev = "0" * 64
    for seq in range(1, n + 1):
        record = json.dumps({"decision": "deny", "i": seq})
        digest = record_hash(prev, seq, f"old{seq}", "decision", 1.5 + seq, record)
        conn.execute(
            "INSERT INTO outbox (seq, call_id, kind, ts, record, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, f"old{seq}", "decision", 1.5 + seq, record, prev, digest),
        )
        prev = digest
    conn.close()


async def test_an_unkeyed_outbox_from_the_previous_version_still_verifies_and_is_sealed(tmp_path: Path) -> None:
    unkeyed_outbox(tmp_path / "audit.db", 3)
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await outbox.start()  # seals the unkeyed part with a `keyed` checkpoint
    await outbox.write("decision", "new1", {"decision": "deny"})
    await outbox.close()
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    result = outbox.verify()
    assert result.intact, result.breaks
    assert (result.records, result.unkeyed) == (4, 3)
    assert [cp.kind for cp in outbox.checkpoints.read()[0]] == ["keyed", "head"]

    conn = db(tmp_path)  # rewrite an old record and rehash everything the old way
    conn.execute("UPDATE outbox SET record = replace(record, 'deny', 'allow') WHERE seq = 2")
    conn.execute("UPDATE outbox SET key_id = NULL")
    rehash_from(conn, 2, key=None)
    found = problems(outbox)
    assert any(seq == 3 and "keyed checkpoint at record 3" in p for seq, p in found)
    assert (4, "an unkeyed record where the chain is keyed (rewritten and rehashed without the key)") in found


async def test_retention_removes_only_shipped_records_and_the_rest_still_verifies(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 10)
    await outbox.mark_shipped([seq for seq in range(1, 11) if seq != 6])  # 6 not shipped yet
    assert await outbox.prune(older_than_seconds=-1) == 5  # 1..5: never 6, nor anything after it
    await outbox.mark_shipped([6])
    assert await outbox.prune(older_than_seconds=-1) == 4  # 6..9: the newest record stays
    await outbox.write("decision", "after", {"decision": "allow"})
    result = outbox.verify()
    assert result.intact, result.breaks
    assert result.records == 2

    db(tmp_path).execute("DELETE FROM outbox WHERE seq = 10")  # beyond what retention removed
    assert (11, "records 10..10 are missing (deleted, beyond what retention removed)") in problems(outbox)


async def test_the_guards_still_refuse_deleting_unshipped_records(tmp_path: Path) -> None:
    await written(tmp_path, 2)
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.execute("INSERT INTO retention (id, through_seq) VALUES (1, 2)")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM outbox WHERE seq = 1")


async def test_retention_compacts_the_checkpoint_file_and_keeps_what_is_not_a_valid_checkpoint(tmp_path: Path) -> None:
    outbox = await written(tmp_path, 12, checkpoint_every=2)
    with outbox.checkpoints.path.open("a") as fh:
        fh.write("an intruder's line\n")
    await outbox.mark_shipped(list(range(1, 13)))
    assert await outbox.prune(older_than_seconds=-1) == 11
    assert await outbox.compact_checkpoints() == 5  # the heads at 2, 4, 6, 8 and 10
    lines = outbox.checkpoints.path.read_text().splitlines()
    kinds = [json.loads(line)["kind"] if line.startswith("{") else line for line in lines]
    assert kinds == ["head", "an intruder's line", "retained"]  # the head at 12, the evidence, the mark
    result = outbox.verify()
    assert [b.problem for b in result.breaks] == [
        'checkpoint file line 2 is not a checkpoint (edited?): "an intruder\'s line"'
    ]
    assert result.records == 1
