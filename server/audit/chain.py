"""The audit hash chain: each record's hash covers the previous record's hash, so an edited, deleted
or reordered record breaks the chain at that point, and `verify` says where."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass

GENESIS = "0" * 64


def record_hash(prev_hash: str, seq: int, call_id: str, kind: str, ts: float, record: str) -> str:
    canonical = json.dumps([prev_hash, seq, call_id, kind, repr(ts), record], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Break:
    """Where the chain breaks, and how it looks."""

    seq: int
    problem: str


@dataclass(frozen=True, slots=True)
class Verification:
    records: int
    head: str
    breaks: tuple[Break, ...]

    @property
    def intact(self) -> bool:
        return not self.breaks


def verify(conn: sqlite3.Connection) -> Verification:
    """Recompute the chain from the first record. Reports each record whose content no longer matches
    its hash (edited), whose predecessor is not the record before it (deleted or reordered), a gap in
    the sequence (deleted), and recorded chain heads that the chain no longer reaches."""
    breaks: list[Break] = []
    expected_prev, expected_seq, count = GENESIS, None, 0
    hashes: dict[int, str] = {}
    rows = conn.execute("SELECT seq, call_id, kind, ts, record, prev_hash, hash FROM outbox ORDER BY seq")
    for seq, call_id, kind, ts, record, prev_hash, stored in rows:
        count += 1
        if expected_seq is not None and seq != expected_seq:
            breaks.append(Break(seq, f"records {expected_seq}..{seq - 1} are missing (deleted)"))
        if prev_hash != expected_prev:
            breaks.append(Break(seq, "does not follow the record before it (a record was deleted or reordered)"))
        if record_hash(prev_hash, seq, call_id, kind, ts, record) != stored:
            breaks.append(Break(seq, "its content does not match its hash (edited)"))
        hashes[seq] = stored
        expected_prev, expected_seq = stored, seq + 1
    for seq, head in conn.execute("SELECT seq, hash FROM chain_heads ORDER BY seq"):
        if hashes.get(seq) != head:
            breaks.append(Break(seq, "a recorded chain head no longer matches the record at that position"))
    return Verification(count, expected_prev, tuple(sorted(breaks, key=lambda b: b.seq)))
