"""The SQLite meter held in memory: exact counts for one gateway process, written behind to meters.db.

Admission, settle and release are a few dictionary operations on the event loop's thread: no
database round trip, no thread hop, and exact under any concurrency (one thread owns the counts, so
no two admissions can interleave). What changed is written to the same SQLite file as the
write-through meter's (same tables, so `castellan usage`, a restart and the write-through meter read
it) at most `write_behind_seconds` later, as one transaction, off the request path.

What a crash can lose: the counting of the last `write_behind_seconds` (a SIGKILL before the next
flush); reservations are released at the next start anyway. One process serves a meters file:
replicas share limits through Redis. A second live instance seen on the file is logged as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from server.call import Budget, RunInfo
from server.errors import BackendUnavailable
from server.identity import Identity
from server.metering import limits as L
from server.metering.admission import admit_in
from server.metering.meter import Admission, Usage, WindowUsage
from server.metering.sqlite import _RUN_TTL_SECONDS, SqliteMeter
from server.settings import Limits

log = structlog.get_logger("castellan.metering")

Reservation = tuple[str, int, float, str]
"""(agent, tokens, expires_at, instance)"""
FlushReport = Callable[[str, int], None]
"""Told ("owed", settles) when a write-behind flush fails, ("written", settles) once they are written."""


class _MemoryStore:
    """The counts, the reservations and the recent calls, with what changed since the last flush."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[int, int, float]] = {}  # key -> (window, value, updated)
        self.reservations: dict[str, Reservation] = {}
        self.by_agent: dict[str, dict[str, None]] = {}
        self.recent: dict[tuple[str, str], deque[float]] = {}
        self.dirty: set[str] = set()
        self.added: dict[str, Reservation] = {}
        self.removed: set[str] = set()
        self.logged: list[tuple[str, str, float]] = []
        self.settles = 0  # settles since the last flush (reported owed if that flush fails)
        self.now = 0.0

    # -- the admission's Store --------------------------------------------------------------------

    def get(self, key: str, window: int) -> int:
        found = self.counters.get(key)
        return found[1] if found is not None and found[0] == window else 0

    def put(self, key: str, window: int, value: int) -> None:
        self.counters[key] = (window, value, self.now)
        self.dirty.add(key)

    def in_flight(self, agent: str, now: float) -> tuple[int, int]:
        held = self.by_agent.get(agent)
        if not held:
            return 0, 0
        count = tokens = 0
        for reservation in list(held):
            _, amount, expires_at, _ = self.reservations[reservation]
            if expires_at < now:
                self.drop(reservation)
                continue
            count, tokens = count + 1, tokens + amount
        return count, tokens

    def window(self, agent: str, key: str, window: int, now: float) -> tuple[int, float]:
        calls = self.recent.get((agent, key))
        if not calls:
            return 0, now
        while calls and calls[0] <= now - window:
            calls.popleft()
        return len(calls), calls[0] if calls else now

    def log_calls(self, rows: list[tuple[str, str, float]]) -> None:
        for agent, key, at in rows:
            self.recent.setdefault((agent, key), deque()).append(at)
        self.logged += rows

    def reserve(self, reservation: str, agent: str, tokens: int, expires_at: float, instance: str) -> None:
        self.hold(reservation, (agent, tokens, expires_at, instance))
        self.added[reservation] = self.reservations[reservation]
        self.removed.discard(reservation)

    # -- the rest ----------------------------------------------------------------------------------

    def hold(self, reservation: str, held: Reservation) -> None:
        self.reservations[reservation] = held
        self.by_agent.setdefault(held[0], {})[reservation] = None

    def drop(self, reservation: str) -> None:
        held = self.reservations.pop(reservation, None)
        if held is None:
            return
        agent = self.by_agent.get(held[0])
        if agent is not None:
            agent.pop(reservation, None)
            if not agent:
                del self.by_agent[held[0]]
        if self.added.pop(reservation, None) is None:
            self.removed.add(reservation)  # it is in the file: delete it there too

    def sweep(self, runs_before: float, calls_before: float) -> None:
        """Forget idle runs' counters and calls older than every sliding window (memory stays bounded)."""
        for key in [k for k, (_, _, updated) in self.counters.items() if k[0] == "r" and updated < runs_before]:
            del self.counters[key]
            self.dirty.discard(key)
        for pair in [k for k, calls in self.recent.items() if not calls or calls[-1] < calls_before]:
            del self.recent[pair]


class BufferedSqliteMeter(SqliteMeter):
    """`SqliteMeter`'s counts in memory, written behind to its file (see the module docstring).

    `admit` raises `Denied("admit", ...)` exactly as the write-through meter does; it raises
    `BackendUnavailable` only when the file could not be read at the first use. A flush that fails
    (a locked or full disk) is retried every interval, its changes kept; `report` hears of it.
    """

    def __init__(
        self,
        path: Path,
        *,
        heartbeat_seconds: float = 5.0,
        instance_timeout: float = 20.0,
        write_behind_seconds: float = 0.1,
    ) -> None:
        super().__init__(path, heartbeat_seconds=heartbeat_seconds, instance_timeout=instance_timeout)
        self._mem = _MemoryStore()
        self._loaded = False
        self._interval = write_behind_seconds
        self._flusher: asyncio.Task[None] | None = None
        self._owed = 0  # settles of failed flushes, reported owed, not yet written
        self.report: FlushReport | None = None
        self.flush_error: str | None = None
        self._warned_shared = False

    async def _load(self) -> None:
        """The file's counts into memory, once, after this instance registered (dead ones released)."""
        if self._loaded:
            return
        if not self._registered:
            await self.reconcile()

        def read(conn: sqlite3.Connection) -> tuple[list[Any], list[Any], list[Any]]:
            return (
                conn.execute("SELECT key, window, value, updated FROM counters").fetchall(),
                conn.execute("SELECT id, agent, tokens, expires_at, instance FROM reservations").fetchall(),
                conn.execute("SELECT agent, key, at FROM recent_calls ORDER BY at").fetchall(),
            )

        counters, reservations, recent = await self._db.run(read)
        if self._loaded:  # another caller loaded it meanwhile
            return
        mem = self._mem
        for key, window, value, updated in counters:
            mem.counters.setdefault(key, (int(window), int(value), float(updated)))
        for rid, agent, tokens, expires_at, instance in reservations:
            if rid not in mem.reservations and rid not in mem.removed:
                mem.hold(str(rid), (str(agent), int(tokens), float(expires_at), str(instance)))
        for agent, key, at in recent:
            mem.recent.setdefault((str(agent), str(key)), deque()).append(float(at))
        self._loaded = True

    async def start(self) -> None:
        await super().start()
        try:
            await self._load()
        except sqlite3.Error as exc:  # admit tries again, and denies until it can
            log.error("meter_load_failed", error=str(exc))

    async def reconcile(self) -> tuple[int, int]:
        count, tokens = await super().reconcile()
        if self._loaded:  # reservations of instances found dead are gone from memory too
            alive = await self._db.run(lambda c: {r[0] for r in c.execute("SELECT id FROM meter_instances")})
            for rid, (_, _, _, instance) in list(self._mem.reservations.items()):
                if instance != self.instance.id and instance not in alive:
                    self._mem.drop(rid)
                    self._mem.removed.discard(rid)  # the reconcile deleted it in the file already
            if alive - {self.instance.id} and not self._warned_shared:
                self._warned_shared = True
                log.error(
                    "meter_file_shared",
                    path=str(self._db.path),
                    reason="another live gateway uses this meters file: in-memory limits are per process; "
                    "use metering.backend = 'redis' for replicas",
                )
        return count, tokens

    async def admit(self, identity: Identity, run: RunInfo, admission: Admission) -> Budget:
        if not self._loaded:
            try:
                await self._load()
            except sqlite3.Error as exc:
                raise BackendUnavailable("admit", f"meter store unavailable: {exc}") from exc
        limits = admission.limits
        self._window = max(self._window, limits.identical_calls_window_seconds, limits.tool_calls_window_seconds)
        now = time.time()
        self._mem.now = now
        budget = admit_in(self._mem, identity.agent_id, run, admission, now, self.instance.id)
        self._changed()
        return budget

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> None:
        mem, agent = self._mem, identity.agent_id
        now = time.time()
        mem.now = now
        mem.drop(reservation)
        for window in L.TOKEN_WINDOWS:
            b = L.bucket(window, now)
            key = f"tokens:{agent}:{window}"
            mem.put(key, b.bucket, mem.get(key, b.bucket) + tokens)
        mem.settles += 1
        self._changed()

    async def release(self, identity: Identity, reservation: str) -> None:
        self._mem.drop(reservation)
        self._changed()

    async def usage(self, agent_id: str, limits: Limits) -> Usage:
        if not self._loaded:
            try:
                await self._load()
            except sqlite3.Error as exc:
                raise BackendUnavailable("usage", f"meter store unavailable: {exc}") from exc
        mem, now = self._mem, time.time()
        in_flight, reserved = mem.in_flight(agent_id, now)

        def rows(kind: str, windows: tuple[L.Window, ...]) -> tuple[WindowUsage, ...]:
            out = []
            for window in windows:
                b = L.bucket(window, now)
                limit = L.call_limit(limits, window) if kind == "calls" else L.token_limit(limits, window)
                out.append(
                    WindowUsage(window, mem.get(f"{kind}:{agent_id}:{window}", b.bucket), limit, b.retry_after(now))
                )
            return tuple(out)

        return Usage(
            agent_id, rows("calls", L.CALL_WINDOWS), rows("tokens", L.TOKEN_WINDOWS), in_flight, reserved, limits
        )

    # -- write-behind ------------------------------------------------------------------------------

    def _changed(self) -> None:
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self._interval)
            while not await self.flush():  # the file refused: changes kept, tried again  # noqa: ASYNC110
                await asyncio.sleep(max(self._interval, 0.5))
        finally:
            self._flusher = None
        if self._pending():
            self._changed()  # changes made during the flush

    def _pending(self) -> bool:
        mem = self._mem
        return bool(mem.dirty or mem.added or mem.removed or mem.logged)

    async def flush(self) -> bool:
        """Writes what changed since the last flush in one transaction. False (changes kept) when the
        file refused it."""
        mem = self._mem
        now = time.time()
        if now - self._swept_at >= 60:
            self._swept_at = now
            mem.sweep(now - _RUN_TTL_SECONDS, now - max(self._window, 60))
        if not self._pending():
            return True
        counters = [(k, *mem.counters[k][:2], mem.counters[k][2]) for k in mem.dirty if k in mem.counters]
        added = [(rid, *held) for rid, held in mem.added.items()]
        removed = [(rid,) for rid in mem.removed]
        logged, settles = mem.logged, mem.settles
        mem.dirty, mem.added, mem.removed, mem.logged, mem.settles = set(), {}, set(), [], 0
        swept_before = now - max(self._window, 60)

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO counters (key, window, value, updated) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE"
                " SET window = excluded.window, value = excluded.value, updated = excluded.updated",
                counters,
            )
            conn.executemany(
                "INSERT OR REPLACE INTO reservations (id, agent, tokens, expires_at, instance) VALUES (?, ?, ?, ?, ?)",
                added,
            )
            conn.executemany("DELETE FROM reservations WHERE id = ?", removed)
            conn.executemany("INSERT INTO recent_calls VALUES (?, ?, ?)", logged)
            conn.execute("DELETE FROM recent_calls WHERE at < ?", (swept_before,))
            conn.execute("DELETE FROM counters WHERE updated < ? AND key LIKE 'r%'", (now - _RUN_TTL_SECONDS,))

        try:
            await self._db.transact(write)
        except (sqlite3.Error, RuntimeError) as exc:
            # Put it back, under what changed since (newer values win; each key's value is its total).
            for key, *_ in counters:
                mem.dirty.add(key)
            for rid, *_ in added:
                if rid in mem.reservations and rid not in mem.removed:
                    mem.added.setdefault(rid, mem.reservations[rid])
            mem.removed |= {rid for (rid,) in removed if rid not in mem.reservations}
            mem.logged[:0] = logged
            if settles and self.report is not None:
                self.report("owed", settles)
            self._owed += settles
            if self.flush_error is None:
                log.warning("meter_write_behind_failed", error=str(exc), path=str(self._db.path))
            self.flush_error = str(exc)
            return False
        if self.flush_error is not None:
            log.info("meter_write_behind_resumed", path=str(self._db.path), settles_written=self._owed)
            self.flush_error = None
        if self._owed and self.report is not None:
            self.report("written", self._owed)
        self._owed = 0
        return True

    async def _sweep(self) -> None:
        return None  # the flush sweeps memory and file together

    async def close(self) -> None:
        """Writes what is still in memory, then releases what this instance holds (as the base does)."""
        if self._closed:
            return
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
            self._flusher = None
        with contextlib.suppress(Exception):
            await self.flush()
        await super().close()
