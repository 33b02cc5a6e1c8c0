"""One SQLite database driven by one worker thread, with group commit, so async code does not block on it
(but for a lone call's quick commit, which it runs itself: `transact(inline=True)`)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_MAX_BATCH = 256
_BUSY_MS = 10_000  # how long a statement waits for another connection's lock
INLINE_MAX_SECONDS = 0.001
"""`transact(fn, inline=True)` runs on the caller's thread only while a commit takes less than this
(a moving average of every commit, on either thread): a slow disk's fsync would hold the event loop."""


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


Write = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any] | Future[Any]]


class _Read:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any] | Future[Any]) -> None:
        self.fn, self.future = fn, future


_Job = list[Write] | _Read | None  # a group of writes (one transaction), a read, or stop


class SqliteDatabase:
    """A WAL-mode SQLite file with a single connection, used by a writer thread (or an inline caller,
    below), one thread at a time.

    `transact(fn)` is the write path: `fn(connection)` runs inside a write transaction that it
    shares with whatever other writes are waiting (group commit: one commit, one fsync, for many
    writers); an exception in one `fn` rolls back only its own work and is raised to its own caller
    (the group is run again, each in a savepoint: `fn` must only touch the database). It returns
    once the transaction is committed. `defer(fn, within)` queues a write that nobody waits for: it
    rides along with the next transaction, or is committed `within` seconds later at the latest
    (bounded write-behind). `run(fn)` is for reads. `synchronous` is FULL where durability matters
    (the audit outbox), NORMAL where a lost last commit is harmless.

    `transact(fn, inline=True)` is for a caller with nothing else to do meanwhile (a single call in
    flight on its loop): when nothing is queued for the writer and the connection is free, the
    transaction runs right there, on the caller's thread, sparing the two thread wake-ups of the
    hand-off (about a tenth of a millisecond of a lone call's latency). The connection is still used
    by one thread at a time (a lock), in the order the work was asked for; a commit that has been
    slow (`INLINE_MAX_SECONDS`) sends it back to the writer.

    The hand-off is cheap on purpose (it is on every governed call): the event loop appends a job to
    the writer's queue (no executor, no task per batch); the writer takes every job waiting, commits
    the writes among them together, and wakes the loop once per committed batch to settle all of its
    futures, not once per future.
    """

    def __init__(self, path: Path, *, schema: str, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._using = threading.Lock()  # held by the thread running statements on the connection
        self._user: int | None = None  # that thread's ident, while it holds `_using`
        self._queued = 0  # jobs handed to the writer and not yet run (under `_lock`)
        self._commit_seconds = 0.0  # a moving average of a group's transaction time
        self._closed = False
        self._conn: sqlite3.Connection | None = None
        self._deferred: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._deferred_timer: asyncio.TimerHandle | None = None
        self.transaction = 0
        """The number of the group transaction being run, or last run (each `BEGIN`, a group run again
        after a rollback included, takes the next): a write sees from it that an earlier write ran in
        the transaction it is in, and can keep what it read then (read by the thread running the transaction)."""

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Used by the writer thread or an inline caller, one at a time (`_using`).
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)
            enable_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            conn.executescript(self._schema)
            self._conn = conn
        return conn

    # -- the loop's side ---------------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        with self._lock:  # nothing is queued behind the writer's stop
            if self._closed:
                raise RuntimeError(f"the database {self.path.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=f"sqlite-{self.path.stem}", daemon=True)
                self._thread.start()
            self._queued += 1
            self._jobs.put(job)

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the database thread and wait (for CLI and start-up code)."""
        if threading.get_ident() == self._user:  # already on it (a job that reads): no deadlock
            return fn(self._connection())
        future: Future[T] = Future()
        self._submit(_Read(fn, future))
        return future.result()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Read(fn, future))
        return await future

    async def transact(self, fn: Callable[[sqlite3.Connection], T], *, inline: bool = False) -> T:
        if inline and self._take_connection():
            try:
                committed = self._transact_here(fn)
            finally:
                self._user = None
                self._using.release()
            if committed is not None:
                return committed[0]
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        writes: list[Write] = [(fn, future)]
        if self._deferred:  # deferred writes first (they are older), in the same transaction
            writes[:0] = self._take_deferred()
        try:
            self._submit(writes)
        except RuntimeError as exc:
            _fail(writes, exc)
        return await future

    def _take_connection(self) -> bool:
        """The connection for the caller's thread, if nothing waits for the writer and commits are quick."""
        if self._queued or self._closed or self._commit_seconds > INLINE_MAX_SECONDS:
            return False
        # Free, or its holder has run its last job and is handing out the results (the writer counts
        # a job done before it settles its futures), or another thread's inline transaction.
        self._using.acquire()
        if self._queued or self._closed:  # handed to the writer meanwhile (it goes first), or closed
            self._using.release()
            return False
        self._user = threading.get_ident()
        return True

    def _transact_here(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[T] | None:
        """(what `fn` returned,) once committed here; None when the transaction could not
        begin at once (another process holds the write lock: the writer thread waits for it, not the
        event loop), or the database is not open yet (the writer opens it, and reports if it cannot)."""
        conn = self._conn
        if conn is None:
            return None
        try:
            self._begin_at_once(conn)
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            return None
        writes = self._take_deferred() if self._deferred else []  # older: first, in the same transaction
        results = self._results([*(write for write, _ in writes), fn], begun=True)
        _settle([(future, ok, value) for (_, future), (ok, value) in zip(writes, results, strict=False)])
        ok, value = results[-1]
        if not ok:
            raise value
        return (value,)

    def defer(self, fn: Callable[[sqlite3.Connection], T], within: float) -> asyncio.Future[T]:
        """Queues a write for a later group commit, at most `within` seconds from now: it joins the
        next `transact` (which waits for no timer), or is committed when the timer fires. The future
        is done once it is committed (or failed); nobody has to wait for it. Returns at once."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._deferred.append((fn, future))
        if self._deferred_timer is None:
            self._deferred_timer = loop.call_later(within, self._deferred_due)
        return future

    def _deferred_due(self) -> None:
        self._deferred_timer = None
        if self._deferred:
            writes = self._take_deferred()
            try:
                self._submit(writes)
            except RuntimeError as exc:
                _fail(writes, exc)

    def _take_deferred(self) -> list[Write]:
        writes: list[Write] = list(self._deferred)
        self._deferred.clear()
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        return writes

    def commit_deferred(self) -> None:
        """Commits the deferred writes now, waiting on the database thread (at shutdown, and before a
        chain head is recorded). Runs on the event loop's thread, outside any transaction."""
        if not self._deferred:
            return
        writes = self._take_deferred()
        done: Future[None] = Future()
        try:
            self._submit([*writes, (lambda _conn: None, done)])
        except RuntimeError as exc:
            _fail(writes, exc)
            return
        # Their own futures are settled on their loop when it next runs (a failure: owed, as always).
        with contextlib.suppress(Exception):
            done.result()

    # -- the writer thread ---------------------------------------------------------------------------

    def _serve(self) -> None:
        me = threading.get_ident()
        jobs = self._jobs
        while True:
            taken = [jobs.get()]
            with contextlib.suppress(queue.Empty):
                while len(taken) < _MAX_BATCH:
                    taken.append(jobs.get_nowait())
            with self._using:
                self._user = me
                try:
                    stopped = self._run_jobs(taken)
                finally:
                    self._user = None
            if stopped:
                return

    def _run_jobs(self, taken: list[_Job]) -> bool:
        """Runs jobs in order, consecutive writes in one transaction; True once told to stop."""
        writes: list[Write] = []
        jobs = 0  # the jobs `writes` came from
        for job in taken:
            if isinstance(job, list):
                writes += job
                jobs += 1
                if len(writes) >= _MAX_BATCH:
                    self._commit(writes, jobs)
                    writes, jobs = [], 0
                continue
            if writes:  # what was asked before this read is committed before it runs
                self._commit(writes, jobs)
                writes, jobs = [], 0
            if job is None:
                self._ran(1)
                self._stop()
                return True
            self._read(job)
        if writes:
            self._commit(writes, jobs)
        return False

    def _ran(self, jobs: int) -> None:
        """Counts jobs done, before their futures hear of it (whoever they wake finds the count down)."""
        with self._lock:
            self._queued -= jobs

    def _commit(self, writes: list[Write], jobs: int) -> None:
        results = self._results([fn for fn, _ in writes])
        self._ran(jobs)
        _settle([(future, ok, value) for (_, future), (ok, value) in zip(writes, results, strict=True)])

    def _results(
        self, fns: list[Callable[[sqlite3.Connection], Any]], *, begun: bool = False
    ) -> list[tuple[bool, Any]]:
        """Each write's (ok, result or error), from one group transaction; its time joins the average
        (the transaction's alone: opening the database is not a commit)."""
        with contextlib.suppress(sqlite3.Error):  # else `_apply` reports it
            self._connection()
        started = time.perf_counter()
        try:
            results = self._apply(fns, begun=begun)
        except BaseException as exc:  # never lose the writer thread; every writer hears of it
            if begun and not isinstance(exc, Exception):
                raise  # inline, on the caller's thread: an interrupt is the caller's
            error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
            results = [(False, error)] * len(fns)
        self._commit_seconds += (time.perf_counter() - started - self._commit_seconds) * 0.125
        return results

    def _read(self, job: _Read) -> None:
        try:
            outcome: tuple[bool, Any] = (True, job.fn(self._connection()))
        except Exception as exc:
            outcome = (False, exc)
        self._ran(1)
        _settle([(job.future, *outcome)])

    def _stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _apply(self, fns: list[Callable[[sqlite3.Connection], Any]], *, begun: bool = False) -> list[tuple[bool, Any]]:
        """Runs a group's writes in one transaction. They run straight through first, without a
        savepoint each (two statements per write, each a round trip on the writer's thread): when
        one of them raises, the transaction is rolled back and the group run again, each write in its
        own savepoint, so only the failing one's work is undone (a group of one has nothing to keep:
        its rollback is the transaction's). A write therefore only touches the database: it may run a
        second time after a rollback, and what it returns is from the run that was committed.
        `begun`: the caller has begun the transaction."""
        try:
            conn = self._connection()
            if not begun:
                self._begin(conn)
        except sqlite3.Error as exc:
            return [(False, exc)] * len(fns)
        try:
            try:
                results: list[tuple[bool, Any]] = [(True, fn(conn)) for fn in fns]
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if len(fns) == 1:
                    return [(False, exc)]
                if begun:  # on the caller's thread: never wait for another process's lock (else all fail)
                    self._begin_at_once(conn)
                else:
                    self._begin(conn)
                results = _each_in_a_savepoint(conn, fns)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # the commit itself failed (disk full, I/O error): nothing is durable
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(False, exc)] * len(fns)
        except BaseException:  # nothing stays open behind the writer (the next BEGIN would fail)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _begin(self, conn: sqlite3.Connection) -> None:
        self.transaction += 1
        conn.execute("BEGIN IMMEDIATE")

    def _begin_at_once(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE without waiting for another connection's lock (raises "database is locked")."""
        conn.execute("PRAGMA busy_timeout=0")
        try:
            self._begin(conn)
        finally:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")

    def close(self) -> None:
        self.commit_deferred()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queued += 1
                self._jobs.put(None)
        if thread is not None:
            thread.join()


def _each_in_a_savepoint(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[bool, Any]]:
    results: list[tuple[bool, Any]] = []
    for fn in fns:
        conn.execute("SAVEPOINT one")
        try:
            results.append((True, fn(conn)))
        except Exception as exc:
            conn.execute("ROLLBACK TO one")
            results.append((False, exc))
        conn.execute("RELEASE one")
    return results


def _fail(writes: list[Write], exc: Exception) -> None:
    for _, future in writes:
        if not future.done():
            future.set_exception(exc)


def _settle(outcomes: list[tuple[asyncio.Future[Any] | Future[Any], bool, Any]]) -> None:
    """Hands results to their futures: an event loop's at once, with one wake-up of that loop for all
    of them (from the writer thread), or none when it is the calling thread's own loop (an inline
    transaction); a waiting thread's directly."""
    here = asyncio._get_running_loop()
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for future, ok, value in outcomes:
        if isinstance(future, asyncio.Future):
            by_loop.setdefault(future.get_loop(), []).append((future, ok, value))
        elif future.set_running_or_notify_cancel():
            future.set_result(value) if ok else future.set_exception(value)
    for loop, settled in by_loop.items():
        if loop is here:
            _resolve(settled)
            continue
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, settled)


def _resolve(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
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
