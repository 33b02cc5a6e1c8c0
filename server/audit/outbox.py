"""The audit outbox: an append-only SQLite table, each record committed durably (WAL, synchronous=FULL)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal, Protocol

from server.errors import BackendUnavailable
from server.sqlite import SqliteDatabase

Kind = Literal["decision", "outcome"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  call_id TEXT NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('decision', 'outcome')),
  ts REAL NOT NULL,
  record TEXT NOT NULL,
  shipped_at REAL,
  UNIQUE (call_id, kind)
);
CREATE TRIGGER IF NOT EXISTS outbox_no_delete BEFORE DELETE ON outbox
BEGIN SELECT RAISE(ABORT, 'the audit outbox is append-only'); END;
"""


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
            conn.execute(
                "INSERT INTO outbox (call_id, kind, ts, record) VALUES (?, ?, ?, ?)",
                (call_id, kind, time.time(), body),
            )

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

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM outbox LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("audit", f"audit log unavailable: {exc}") from exc

    async def close(self) -> None:
        self._db.close()
