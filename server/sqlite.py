"""One SQLite database driven by one worker thread, with group commit, so async code never blocks on it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_MAX_BATCH = 256


class SqliteDatabase:
    """A WAL-mode SQLite file with a single connection owned by a single thread.

    `transact(fn)` is the write path: `fn(connection)` runs inside a write transaction that it
    shares with whatever other writes are waiting (group commit: one commit, one fsync, for many
    writers), each in its own savepoint, so an exception in one `fn` rolls back only its own work
    and is raised to its own caller. It returns once the transaction is committed. `run(fn)` is for
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
        self._flusher: asyncio.Task[None] | None = None

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
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
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            fns = [fn for fn, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._apply, fns)
            except BaseException as exc:  # the thread pool itself failed (closed): every writer hears it
                results = [(False, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))] * len(batch)
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

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
        def _close() -> None:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)


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
