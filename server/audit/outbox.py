"""The audit outbox: an append-only SQLite table, each record committed durably (WAL, synchronous=FULL)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from server.audit.chain import GENESIS, Verification, record_hash, verify
from server.audit.search import AuditQuery, search, show
from server.errors import BackendUnavailable
from server.sqlite import SqliteDatabase

log = structlog.get_logger("castellan.audit")

Kind = Literal["decision", "outcome"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  call_id TEXT NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('decision', 'outcome')),
  ts REAL NOT NULL,
  record TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL,
  shipped_at REAL,
  UNIQUE (call_id, kind)
);
CREATE INDEX IF NOT EXISTS outbox_unshipped ON outbox (shipped_at, seq);
CREATE TABLE IF NOT EXISTS chain_heads (
  seq INTEGER PRIMARY KEY,
  hash TEXT NOT NULL,
  recorded_at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS outbox_no_delete BEFORE DELETE ON outbox
BEGIN SELECT RAISE(ABORT, 'the audit outbox is append-only'); END;
CREATE TRIGGER IF NOT EXISTS outbox_no_update BEFORE UPDATE OF seq, call_id, kind, ts, record, prev_hash, hash
ON outbox BEGIN SELECT RAISE(ABORT, 'audit records cannot be changed'); END;
"""
# A chain head every this many records, and in the log, so a copy of the chain's state exists
# outside the database an intruder could rewrite whole.
_HEAD_EVERY = 1000


@dataclass(slots=True)
class PendingCall:
    """One call's records waiting to be shipped."""

    call_id: str
    seqs: list[int] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    decided_at: float = 0.0
    outcome: dict[str, Any] | None = None


class Outbox(Protocol):
    """Where audit records are committed. `write` returns only once the record is durable;
    it raises `BackendUnavailable("audit", ...)` when it cannot write."""

    async def write(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...


class SqliteOutbox:
    """Appends audit records; `write` returns only once the row is committed to disk.

    Raises `BackendUnavailable("audit", ...)` when it cannot write: the caller denies the call.
    """

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, schema=_SCHEMA, synchronous="FULL")

    async def write(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None:
        body = json.dumps(record, separators=(",", ":"), default=str)

        def insert(conn: sqlite3.Connection) -> None:
            last = conn.execute("SELECT seq, hash FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            ts = time.time()
            digest = record_hash(prev, seq, call_id, kind, ts, body)
            conn.execute(
                "INSERT INTO outbox (seq, call_id, kind, ts, record, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, call_id, kind, ts, body, prev, digest),
            )
            if seq % _HEAD_EVERY == 0:
                conn.execute("INSERT INTO chain_heads VALUES (?, ?, ?)", (seq, digest, ts))
                log.info("audit_chain_head", seq=seq, hash=digest)

        try:
            await self._db.transact(insert)
        except sqlite3.Error as exc:
            raise BackendUnavailable("audit", f"audit log unavailable: {exc}") from exc

    async def records(self, call_id: str) -> dict[str, dict[str, Any]]:
        """The records of one call, by kind."""
        rows = await self._db.run(
            lambda c: c.execute("SELECT kind, record FROM outbox WHERE call_id = ?", (call_id,)).fetchall()
        )
        return {kind: json.loads(record) for kind, record in rows}

    async def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest decision records, newest first."""
        rows = await self._db.run(
            lambda c: c.execute(
                "SELECT record FROM outbox WHERE kind = 'decision' ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        )
        return [json.loads(r[0]) for r in rows]

    def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        return self._db.run_sync(lambda c: search(c, query))

    def show(self, call_id: str) -> dict[str, Any] | None:
        return self._db.run_sync(lambda c: show(c, call_id))

    async def search_async(self, query: AuditQuery) -> list[dict[str, Any]]:
        return await self._db.run(lambda c: search(c, query))

    async def show_async(self, call_id: str) -> dict[str, Any] | None:
        return await self._db.run(lambda c: show(c, call_id))

    async def pending(self, limit: int, incomplete_after: float) -> list[PendingCall]:
        """Calls with records not yet shipped, oldest first, that are ready: finished (an outcome, or a
        decision that stopped the call), or allowed but without an outcome for `incomplete_after` seconds."""

        def read(conn: sqlite3.Connection) -> list[PendingCall]:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT call_id FROM outbox WHERE shipped_at IS NULL GROUP BY call_id ORDER BY MIN(seq) LIMIT ?",
                    (limit,),
                )
            ]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT seq, call_id, kind, ts, record FROM outbox WHERE call_id IN ({marks}) ORDER BY seq", ids
            ).fetchall()
            calls: dict[str, PendingCall] = {}
            for seq, call_id, kind, ts, record in rows:
                call = calls.setdefault(call_id, PendingCall(call_id))
                call.seqs.append(seq)
                if kind == "decision":
                    call.decision, call.decided_at = json.loads(record), ts
                else:
                    call.outcome = json.loads(record)
            stale = time.time() - incomplete_after
            return [
                c
                for c in calls.values()
                if c.decision is not None
                and (c.outcome is not None or c.decision.get("decision") != "allow" or c.decided_at < stale)
            ]

        return await self._db.run(read)

    async def mark_shipped(self, seqs: list[int]) -> None:
        """Marks records shipped, once their trace is confirmed written."""
        if not seqs:
            return
        now = time.time()
        marks = ",".join("?" * len(seqs))
        await self._db.transact(
            lambda c: c.execute(f"UPDATE outbox SET shipped_at = ? WHERE seq IN ({marks})", [now, *seqs])
        )

    async def backlog(self) -> tuple[int, float]:
        """(records not yet shipped, seconds the oldest of them has waited; 0 when none)."""
        row = await self._db.run(
            lambda c: c.execute("SELECT COUNT(*), MIN(ts) FROM outbox WHERE shipped_at IS NULL").fetchone()
        )
        return int(row[0]), time.time() - row[1] if row[1] is not None else 0.0

    def verify(self) -> Verification:
        """Recompute the hash chain (synchronous: for the CLI)."""
        return self._db.run_sync(verify)

    def record_head(self) -> tuple[int, str]:
        """Record the current chain head now (e.g. at shutdown or on a schedule); returns it."""

        def write(conn: sqlite3.Connection) -> tuple[int, str]:
            last = conn.execute("SELECT seq, hash FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
            if last is None:
                return 0, GENESIS
            conn.execute("INSERT OR IGNORE INTO chain_heads VALUES (?, ?, ?)", (last[0], last[1], time.time()))
            return int(last[0]), str(last[1])

        return self._db.run_sync(write)

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM outbox LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("audit", f"audit log unavailable: {exc}") from exc

    async def close(self) -> None:
        self._db.close()
