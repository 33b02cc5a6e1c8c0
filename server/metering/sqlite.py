"""The SQLite meter: counters and reservations in one WAL database, each admit and settle one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path

import structlog

from server.call import Budget, RunInfo
from server.errors import BackendUnavailable
from server.identity import Identity
from server.metering import limits as L
from server.metering.admission import admit_in
from server.metering.instances import Instance, dead
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
  expires_at REAL NOT NULL,
  instance TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reservations_by_agent ON reservations (agent, expires_at);
CREATE TABLE IF NOT EXISTS recent_calls (
  agent TEXT NOT NULL,
  key TEXT NOT NULL,
  at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recent_calls_by_key ON recent_calls (agent, key, at);
CREATE INDEX IF NOT EXISTS recent_calls_by_age ON recent_calls (at);
CREATE TABLE IF NOT EXISTS meter_instances (
  id TEXT PRIMARY KEY,
  info TEXT NOT NULL,
  heartbeat REAL NOT NULL
);
"""
_RUN_TTL_SECONDS = 86_400
log = structlog.get_logger("castellan.metering")


def _migrate(conn: sqlite3.Connection) -> None:
    """Meters files from before reservations carried their instance get the column (and its index)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(reservations)")}
    if "instance" not in columns:
        conn.execute("ALTER TABLE reservations ADD COLUMN instance TEXT NOT NULL DEFAULT ''")
    conn.execute("CREATE INDEX IF NOT EXISTS reservations_by_instance ON reservations (instance)")


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
    """Counters per agent and window, calls and repeats per run, sliding windows of recent calls per
    agent, and in-flight reservations, each tagged with this process's meter instance.

    One gateway process serves a meters file; at `start` it releases every reservation of instances
    that are gone (a crashed predecessor's in-flight calls), at once when it sees the process is
    gone (same machine), else once the instance's heartbeat is older than `instance_timeout`.
    """

    def __init__(self, path: Path, *, heartbeat_seconds: float = 5.0, instance_timeout: float = 20.0) -> None:
        self._db = SqliteDatabase(path, schema=_SCHEMA)
        self._db.run_sync(_migrate)
        self._swept_at = 0.0
        self.instance = Instance.this_process()
        self._heartbeat_seconds = heartbeat_seconds
        self._instance_timeout = instance_timeout
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._registered = False
        self._window = 0  # the longest sliding window admissions have used: older recent calls are swept

    async def start(self) -> None:
        """Register this instance, release what dead instances held, and keep the heartbeat."""
        try:
            await self.reconcile()
        except sqlite3.Error as exc:  # the store is not answering: admit denies until it does
            log.error("meter_reconcile_failed", error=str(exc))
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def reconcile(self) -> tuple[int, int]:
        """Mark this instance alive; release reservations of dead instances (and of reservations from
        before instances were recorded). Returns (reservations, tokens) released."""
        me = self.instance

        def write(conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
            now = time.time()
            conn.execute(
                "INSERT INTO meter_instances VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET heartbeat = excluded.heartbeat",
                (me.id, json.dumps(me.as_dict()), now),
            )
            gone = []
            for instance_id, info, heartbeat in conn.execute("SELECT id, info, heartbeat FROM meter_instances"):
                other = Instance.from_dict({**json.loads(info), "id": instance_id})
                if dead(other, me, now - heartbeat, self._instance_timeout):
                    gone.append(instance_id)
            known = {row[0] for row in conn.execute("SELECT id FROM meter_instances")} - set(gone)
            held = conn.execute(
                "SELECT instance, count(*), coalesce(sum(tokens), 0) FROM reservations GROUP BY instance"
            )
            count = tokens = 0
            orphans = []
            for instance_id, n, t in held.fetchall():
                if instance_id not in known:
                    orphans.append(instance_id)
                    count, tokens = count + int(n), tokens + int(t)
            for instance_id in orphans:
                conn.execute("DELETE FROM reservations WHERE instance = ?", (instance_id,))
            for instance_id in gone:
                conn.execute("DELETE FROM meter_instances WHERE id = ?", (instance_id,))
            return count, tokens, gone

        count, tokens, gone = await self._db.transact(write)
        self._registered = True
        if count or gone:
            log.warning(
                "meter_reconciled",
                released_reservations=count,
                released_tokens=tokens,
                dead_instances=gone,
                instance=me.id,
            )
        return count, tokens

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                await self.reconcile()
            except sqlite3.Error as exc:
                log.warning("meter_heartbeat_failed", error=str(exc))

    async def admit(self, identity: Identity, run: RunInfo, admission: Admission) -> Budget:
        instance = self.instance.id
        try:
            if not self._registered:  # before its first reservation: never mistaken for an orphan's
                await self.reconcile()
            limits = admission.limits
            self._window = max(self._window, limits.identical_calls_window_seconds, limits.tool_calls_window_seconds)
            await self._sweep()
            return await self._db.transact(
                lambda c: _admit(c, identity.agent_id, run, admission, time.time(), instance)
            )
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
        """Forget run and repeat counters of runs idle for a day, and recent calls older than the
        longest sliding window in use (one-off argument sets would otherwise pile up); at most once
        a minute."""
        now = time.time()
        if now - self._swept_at < 60:
            return
        self._swept_at = now
        cutoff = now - _RUN_TTL_SECONDS
        recent = now - max(self._window, 60)

        def sweep(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM counters WHERE updated < ? AND key LIKE 'r%'", (cutoff,))
            conn.execute("DELETE FROM recent_calls WHERE at < ?", (recent,))

        await self._db.transact(sweep)

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM counters LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("admit", f"meter store unavailable: {exc}") from exc

    async def close(self) -> None:
        """Stop the heartbeat and release what this instance still holds (its process is leaving)."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        me = self.instance.id

        def leave(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM reservations WHERE instance = ?", (me,))
            conn.execute("DELETE FROM meter_instances WHERE id = ?", (me,))

        with contextlib.suppress(sqlite3.Error, RuntimeError):
            await self._db.transact(leave)
        self._db.close()


class _SqlStore:
    """The admission's reads and writes as statements, inside the caller's transaction."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self._counters = _Counters(conn, now)
        self.get, self.put = self._counters.get, self._counters.put

    def in_flight(self, agent: str, now: float) -> tuple[int, int]:
        return _in_flight(self.conn, agent, now)

    def window(self, agent: str, key: str, window: int, now: float) -> tuple[int, float]:
        """Calls of `key` by `agent` in the last `window` seconds, and when the oldest of them was."""
        conn = self.conn
        conn.execute("DELETE FROM recent_calls WHERE agent = ? AND key = ? AND at <= ?", (agent, key, now - window))
        row = conn.execute(
            "SELECT count(*), coalesce(min(at), ?) FROM recent_calls WHERE agent = ? AND key = ?", (now, agent, key)
        ).fetchone()
        return int(row[0]), float(row[1])

    def log_calls(self, rows: list[tuple[str, str, float]]) -> None:
        self.conn.executemany("INSERT INTO recent_calls VALUES (?, ?, ?)", rows)

    def reserve(self, reservation: str, agent: str, tokens: int, expires_at: float, instance: str) -> None:
        self.conn.execute(
            "INSERT INTO reservations (id, agent, tokens, expires_at, instance) VALUES (?, ?, ?, ?, ?)",
            (reservation, agent, tokens, expires_at, instance),
        )


def _admit(conn: sqlite3.Connection, agent: str, run: RunInfo, a: Admission, now: float, instance: str = "") -> Budget:
    """Inside the caller's savepoint: raising a denial rolls back its writes (SqliteDatabase.transact)."""
    return admit_in(_SqlStore(conn, now), agent, run, a, now, instance)
