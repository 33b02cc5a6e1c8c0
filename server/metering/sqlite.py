"""The SQLite meter: counters in one WAL database, each admit and charge one transaction."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from server.call import Budget, RunInfo
from server.errors import BackendUnavailable, Denied
from server.identity import Identity
from server.settings import Limits
from server.sqlite import SqliteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
  key TEXT PRIMARY KEY,
  window INTEGER NOT NULL,
  value INTEGER NOT NULL,
  updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS counters_by_age ON counters (updated);
"""
_RUN_TTL_SECONDS = 86_400


class _Counters:
    """Read-modify-write of windowed counters inside one open transaction."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now

    def get(self, key: str, window: int) -> int:
        row = self.conn.execute("SELECT window, value FROM counters WHERE key = ?", (key,)).fetchone()
        return int(row[1]) if row is not None and row[0] == window else 0

    def put(self, key: str, window: int, value: int) -> None:
        self.conn.execute(
            "INSERT INTO counters (key, window, value, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET window = excluded.window, value = excluded.value, "
            "updated = excluded.updated",
            (key, window, value, self.now),
        )


class SqliteMeter:
    """Counters per agent: calls this minute, tokens today, calls and repeats per run."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, schema=_SCHEMA)
        self._swept_at = 0.0

    async def admit(self, identity: Identity, run: RunInfo, call_key: str, limits: Limits) -> Budget:
        try:
            await self._sweep()
            return await self._db.transact(lambda c: _admit(c, identity.agent_id, run, call_key, limits, time.time()))
        except sqlite3.Error as exc:
            raise BackendUnavailable("admit", f"meter store unavailable: {exc}") from exc

    async def _sweep(self) -> None:
        """Forget run and repeat counters of runs idle for a day; at most once a minute."""
        now = time.time()
        if now - self._swept_at < 60:
            return
        self._swept_at = now
        cutoff = now - _RUN_TTL_SECONDS
        await self._db.transact(
            lambda c: c.execute("DELETE FROM counters WHERE updated < ? AND key LIKE 'r%'", (cutoff,))
        )

    async def charge(self, identity: Identity, tokens: int) -> None:
        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            day = int(now // 86_400)
            counters = _Counters(conn, now)
            key = f"tokens:{identity.agent_id}"
            counters.put(key, day, counters.get(key, day) + tokens)

        try:
            await self._db.transact(write)
        except sqlite3.Error as exc:
            raise BackendUnavailable("charge", f"meter store unavailable: {exc}") from exc

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM counters LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("admit", f"meter store unavailable: {exc}") from exc

    async def close(self) -> None:
        self._db.close()


def _admit(conn: sqlite3.Connection, agent: str, run: RunInfo, call_key: str, limits: Limits, now: float) -> Budget:
    minute, day = int(now // 60), int(now // 86_400)
    # Runs inside the caller's savepoint (SqliteDatabase.transact): raising Denied rolls back its writes.
    c = _Counters(conn, now)
    calls = c.get(f"calls:{agent}", minute)
    if limits.calls_per_minute and calls >= limits.calls_per_minute:
        retry = 60 - int(now % 60)
        raise Denied(
            "admit",
            f"rate limit: {limits.calls_per_minute} calls per minute reached (retry_after={retry}s)",
        )
    tokens = c.get(f"tokens:{agent}", day)
    if limits.tokens_per_day and tokens >= limits.tokens_per_day:
        retry = 86_400 - int(now % 86_400)
        raise Denied(
            "admit",
            f"token budget: {tokens} of {limits.tokens_per_day} tokens per day used (retry_after={retry}s)",
        )
    run_calls = c.get(f"run:{agent}:{run.run_id}", 0) + 1
    if limits.max_run_calls and run_calls > limits.max_run_calls:
        raise Denied(
            "admit",
            f"loop depth: run {run.run_id} reached the maximum of {limits.max_run_calls} tool calls",
        )
    repeats = c.get(f"repeat:{agent}:{run.run_id}:{call_key}", 0) + 1
    if limits.max_repeats and repeats > limits.max_repeats:
        raise Denied(
            "admit",
            f"loop detected: the same tool and arguments {repeats} times in run "
            f"{run.run_id} (max {limits.max_repeats})",
        )
    c.put(f"calls:{agent}", minute, calls + 1)
    c.put(f"run:{agent}:{run.run_id}", 0, run_calls)
    c.put(f"repeat:{agent}:{run.run_id}:{call_key}", 0, repeats)
    return Budget(
        tokens_used=tokens,
        tokens_limit=limits.tokens_per_day,
        calls_this_minute=calls + 1,
        run_calls=run_calls,
        repeats=repeats,
    )
