"""One SQLite database driven by one worker thread, with group commit, so async code never blocks on it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_MAX_BATCH = 256


def enable_wal(conn: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Puts `conn`'s database in WAL mode, waiting up to `timeout` seconds for other connections.

    Switching the journal mode takes an exclusive lock, and SQLite answers "database is locked" at
    once, without its busy handler, when another connection is opening the same new file at that
    moment (two processes or queues starting together: about 1 open in 60 under a three-way race).
    The switch is retried with a short backoff instead, so opening never fails on that race.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class SqliteDatabase:
    """A WAL-mode SQLite file with a single connection owned by a single thread.

    `transact(fn)` is the write path: `fn(connection)` runs inside a write transaction that it
    shares with whatever other writes are waiting (group commit: one commit, one fsync, for many
    writers), each in its own savepoint, so an exception in one `fn` rolls back only its own work
    and is raised to its own caller. It returns once the transaction is committed. `defer(fn, within)`
    queues a write that nobody waits for: it rides along with the next transaction, or is committed
    `within` seconds later at the latest (bounded write-behind). `run(fn)` is for
    reads. `synchronous` is FULL where durability matters (the audit outbox), NORMAL where a lost
    last commit is harmless.
    """

    def __init__(self, path: Path, *, schema: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._local = threading.local()
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._deferred: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task[None] | None = None

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            enable_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.executescript(self._schema)
            self._local.conn = conn
        return conn

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the database thread and wait (for CLI and start-up code)."""
        return self._executor.submit(lambda: fn(self._connection())).result()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._connection()))

    async def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, future))
        self._start_flusher(loop)
        return await future

    def defer(self, fn: Callable[[sqlite3.Connection], T], within: float) -> asyncio.Future[T]:
        """Queues a write for a later group commit, at most `within` seconds from now: it joins the
        next `transact` (which waits for no timer), or is committed when the timer fires. The future
        is done once it is committed (or failed); nobody has to wait for it. Returns at once."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._deferred.append((fn, future))
        if self._deferred_timer is None:
            self._deferred_timer = loop.call_later(within, self._deferred_due, loop)
        return future

    def _deferred_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._deferred_timer = None
        if self._deferred:
            self._start_flusher(loop)

    def _start_flusher(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())

    def _take(self) -> list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]:
        """The next batch: deferred writes first (they are older), then the waiting ones."""
        if self._deferred:
            self._queue[:0], self._deferred = self._deferred, []
            if self._deferred_timer is not None:
                self._deferred_timer.cancel()
                self._deferred_timer = None
        batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
        return batch

    def commit_deferred(self) -> None:
        """Commits the deferred writes now, waiting on the database thread (at shutdown, and before a
        chain head is recorded). Runs on the event loop's thread, outside any transaction."""
        while self._deferred:
            batch, self._deferred = self._deferred[:_MAX_BATCH], self._deferred[_MAX_BATCH:]
            fns = [fn for fn, _ in batch]
            try:
                results = self._executor.submit(self._apply, fns).result()
            except BaseException as exc:
                results = [(False, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))] * len(batch)
            _settle(batch, results)
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue or self._deferred:
            if self._deferred and not self._queue and self._deferred_timer is not None:
                return  # only deferred writes, not due yet: the timer starts the next flush
            batch = self._take()
            fns = [fn for fn, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._apply, fns)
            except BaseException as exc:  # the thread pool itself failed (closed): every writer hears it
                results = [(False, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))] * len(batch)
            _settle(batch, results)

    def _apply(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(False, exc)] * len(fns)
        results: list[tuple[bool, Any]] = []
        try:
            for fn in fns:
                conn.execute("SAVEPOINT one")
                try:
                    results.append((True, fn(conn)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO one")
                    results.append((False, exc))
                conn.execute("RELEASE one")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # the commit itself failed (disk full, I/O error): nothing is durable
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(False, exc)] * len(fns)
        return results

    def close(self) -> None:
        self.commit_deferred()

        def _close() -> None:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)


def _settle(batch: list[tuple[Any, asyncio.Future[Any]]], results: list[tuple[bool, Any]]) -> None:
    for (_, future), (ok, value) in zip(batch, results, strict=True):
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken up front (`BEGIN IMMEDIATE`) so read-then-write is atomic.
    For synchronous admin writes (`run_sync`); the request path uses `SqliteDatabase.transact`."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
