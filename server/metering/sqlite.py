"""The SQLite meter: counters and reservations in one WAL database, each admit and settle one transaction."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from server.call import Budget, RunInfo
from server.errors import BackendUnavailable
from server.identity import Identity
from server.metering import limits as L
from server.metering.meter import Admission, Usage, WindowUsage
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
CREATE TABLE IF NOT EXISTS reservations (
  id TEXT PRIMARY KEY,
  agent TEXT NOT NULL,
  tokens INTEGER NOT NULL,
  expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_agent ON reservations (agent, expires_at);
"""
_RUN_TTL_SECONDS = 86_400


class _Counters:
    """Read-modify-write of windowed counters inside the caller's transaction."""

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


def _in_flight(conn: sqlite3.Connection, agent: str, now: float) -> tuple[int, int]:
    conn.execute("DELETE FROM reservations WHERE agent = ? AND expires_at < ?", (agent, now))
    row = conn.execute(
        "SELECT count(*), coalesce(sum(tokens), 0) FROM reservations WHERE agent = ?", (agent,)
    ).fetchone()
    return int(row[0]), int(row[1])


class SqliteMeter:
    """Counters per agent and window, calls and repeats per run, and in-flight reservations."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, schema=_SCHEMA)
        self._swept_at = 0.0

    async def admit(self, identity: Identity, run: RunInfo, admission: Admission) -> Budget:
        try:
            await self._sweep()
            return await self._db.transact(lambda c: _admit(c, identity.agent_id, run, admission, time.time()))
        except sqlite3.Error as exc:
            raise BackendUnavailable("admit", f"meter store unavailable: {exc}") from exc

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> None:
        agent = identity.agent_id

        def write(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
            counters = _Counters(conn, now)
            for window in L.TOKEN_WINDOWS:
                b = L.bucket(window, now)
                key = f"tokens:{agent}:{window}"
                counters.put(key, b.bucket, counters.get(key, b.bucket) + tokens)

        try:
            await self._db.transact(write)
        except sqlite3.Error as exc:
            raise BackendUnavailable("charge", f"meter store unavailable: {exc}") from exc

    async def release(self, identity: Identity, reservation: str) -> None:
        try:
            await self._db.transact(lambda c: c.execute("DELETE FROM reservations WHERE id = ?", (reservation,)))
        except sqlite3.Error as exc:
            raise BackendUnavailable("charge", f"meter store unavailable: {exc}") from exc

    async def usage(self, agent_id: str, limits: Limits) -> Usage:
        def read(conn: sqlite3.Connection) -> Usage:
            now = time.time()
            counters = _Counters(conn, now)
            in_flight, reserved = _in_flight(conn, agent_id, now)

            def rows(kind: str, windows: tuple[L.Window, ...]) -> tuple[WindowUsage, ...]:
                out = []
                for window in windows:
                    b = L.bucket(window, now)
                    limit = L.call_limit(limits, window) if kind == "calls" else L.token_limit(limits, window)
                    used = counters.get(f"{kind}:{agent_id}:{window}", b.bucket)
                    out.append(WindowUsage(window, used, limit, b.retry_after(now)))
                return tuple(out)

            return Usage(
                agent_id, rows("calls", L.CALL_WINDOWS), rows("tokens", L.TOKEN_WINDOWS), in_flight, reserved, limits
            )

        try:
            return await self._db.transact(read)
        except sqlite3.Error as exc:
            raise BackendUnavailable("usage", f"meter store unavailable: {exc}") from exc

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

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM counters LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("admit", f"meter store unavailable: {exc}") from exc

    async def close(self) -> None:
        self._db.close()


def _admit(conn: sqlite3.Connection, agent: str, run: RunInfo, a: Admission, now: float) -> Budget:
    """Every limit checked, then everything counted, inside the caller's savepoint: raising a denial
    rolls back its writes (SqliteDatabase.transact)."""
    limits, c = a.limits, _Counters(conn, now)
    in_flight, reserved = _in_flight(conn, agent, now)
    calls: dict[L.Window, tuple[L.Bucket, int]] = {}
    for window in L.CALL_WINDOWS:
        b = L.bucket(window, now)
        used = c.get(f"calls:{agent}:{window}", b.bucket)
        calls[window] = (b, used)
        maximum = L.call_limit(limits, window)
        if maximum and used + 1 > maximum:
            raise L.rate_denied(window, used, maximum, b.retry_after(now))
    if limits.concurrent_calls and in_flight + 1 > limits.concurrent_calls:
        raise L.concurrency_denied(in_flight, limits.concurrent_calls)
    day_tokens = 0
    for window in L.TOKEN_WINDOWS:
        b = L.bucket(window, now)
        used = c.get(f"tokens:{agent}:{window}", b.bucket)
        day_tokens = used if window == "day" else day_tokens
        maximum = L.token_limit(limits, window)
        if maximum and used + reserved + a.estimate > maximum:
            raise L.budget_denied(window, used, reserved, a.estimate, maximum, b.retry_after(now))
    if limits.max_depth and run.depth > limits.max_depth:
        raise L.depth_denied(run.depth, limits.max_depth)
    run_calls = c.get(f"run:{agent}:{run.run_id}", 0) + 1
    if limits.max_run_calls and run_calls > limits.max_run_calls:
        raise L.run_denied(run.run_id, limits.max_run_calls)
    repeats = c.get(f"repeat:{agent}:{run.run_id}:{a.call_key}", 0) + 1
    if limits.max_repeats and repeats > limits.max_repeats:
        raise L.repeat_denied(run.run_id, repeats, limits.max_repeats)
    for window, (b, used) in calls.items():
        c.put(f"calls:{agent}:{window}", b.bucket, used + 1)
    c.put(f"run:{agent}:{run.run_id}", 0, run_calls)
    c.put(f"repeat:{agent}:{run.run_id}:{a.call_key}", 0, repeats)
    conn.execute("INSERT INTO reservations VALUES (?, ?, ?, ?)", (a.reservation, agent, a.estimate, now + a.ttl))
    return Budget(
        tokens_used=day_tokens,
        tokens_limit=limits.tokens_per_day,
        calls_this_minute=calls["minute"][1] + 1,
        run_calls=run_calls,
        repeats=repeats,
        reservation=a.reservation,
        reserved_tokens=a.estimate,
    )
