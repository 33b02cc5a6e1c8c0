"""One SQLite database driven by one worker thread, so async code never blocks on it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SqliteDatabase:
    """A WAL-mode SQLite file with a single connection owned by a single thread.

    All work goes through `run(fn)`, which calls `fn(connection)` on that thread; writes in one
    `fn` are one transaction when `fn` uses `with transaction(connection):`. `synchronous` is FULL where
    durability matters (the audit outbox) and NORMAL where a lost last commit is harmless.
    """

    def __init__(self, path: Path, *, schema: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._local = threading.local()

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
    """One write transaction, taken up front (`BEGIN IMMEDIATE`) so read-then-write is atomic."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
