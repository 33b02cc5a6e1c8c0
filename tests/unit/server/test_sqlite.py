"""The group-committed SQLite database: many writers share one transaction and one loop wake-up,
each writer hears of its own failure only, and a closed database refuses work instead of hanging."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from server.sqlite import SqliteDatabase

pytestmark = pytest.mark.anyio
SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE);"


class CountingDatabase(SqliteDatabase):
    """Counts the transactions it commits (each `_apply` is one BEGIN ... COMMIT, one fsync)."""

    transactions = 0

    def _apply(self, fns: list[Any], *, begun: bool = False) -> list[tuple[bool, Any]]:
        self.transactions += 1
        return super()._apply(fns, begun=begun)


def insert(value: str) -> Any:
    return lambda conn: conn.execute("INSERT INTO t (v) VALUES (?)", (value,)).lastrowid


async def test_concurrent_writers_share_transactions_and_each_is_committed(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("warm"))  # the writer thread and its connection exist
    db.transactions = 0
    await asyncio.gather(*(db.transact(insert(f"v{i}")) for i in range(200)))
    assert db.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == 201
    assert db.transactions < 200  # group commit: fewer commits than writers
    db.close()


async def test_a_failing_writer_fails_alone_and_the_others_in_its_batch_are_committed(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("taken"))
    results = await asyncio.gather(
        db.transact(insert("a")), db.transact(insert("taken")), db.transact(insert("b")), return_exceptions=True
    )
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)
    rows = await db.run(lambda c: sorted(r[0] for r in c.execute("SELECT v FROM t")))
    assert rows == ["a", "b", "taken"]
    db.close()


async def test_in_one_transaction_a_failing_writer_undoes_only_its_own_work(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("taken"))
    held = threading.Event()
    blocked = db.run(lambda _conn: held.wait(10))  # the writer waits: the writes below queue as one group

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (v) VALUES ('half')")
        conn.execute("INSERT INTO t (v) VALUES ('taken')")

    writes = asyncio.gather(
        db.transact(insert("a")), db.transact(half_then_fail), db.transact(insert("b")), return_exceptions=True
    )
    await asyncio.sleep(0.05)
    held.set()
    await blocked
    first, failed, last = await writes
    assert isinstance(failed, sqlite3.IntegrityError)
    rows = await db.run(lambda c: dict(c.execute("SELECT v, id FROM t").fetchall()))
    assert sorted(rows) == ["a", "b", "taken"]  # nothing of the failed write, all of the others
    assert (first, last) == (rows["a"], rows["b"])  # what each was told is what was committed
    assert db.transactions == 2
    db.close()


async def test_a_writer_failing_alone_is_rolled_back_and_the_next_write_commits(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("taken"))

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (v) VALUES ('half')")
        raise ValueError("refused")

    def interrupted(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (v) VALUES ('cut off')")
        raise KeyboardInterrupt

    with pytest.raises(ValueError, match="refused"):
        await db.transact(half_then_fail)
    with pytest.raises(RuntimeError):
        await db.transact(interrupted)
    await db.transact(insert("next"))
    assert await db.run(lambda c: sorted(r[0] for r in c.execute("SELECT v FROM t"))) == ["next", "taken"]
    db.close()


async def test_a_committed_batch_wakes_the_event_loop_once_not_once_per_writer(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("warm"))
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
    try:
        # Queued in one turn of the loop: the writer takes them as one batch (or a few, if it
        # woke between two of them), never one wake-up each.
        await asyncio.gather(*(db.transact(insert(f"v{i}")) for i in range(100)))
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
    assert 1 <= wakeups < 100
    db.close()


async def test_a_deferred_write_is_committed_within_its_interval_without_another_write(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    done = db.defer(insert("later"), 0.05)
    assert not done.done()
    await asyncio.wait_for(done, 10)  # bounded: the interval is 0.05 s
    assert await db.run(lambda c: c.execute("SELECT v FROM t").fetchall()) == [("later",)]
    db.close()


async def test_reading_from_inside_a_write_runs_inline_instead_of_deadlocking(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)

    def write_then_count(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t (v) VALUES ('x')")
        return int(db.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0]))

    assert await asyncio.wait_for(db.transact(write_then_count), 10) == 1
    db.close()


async def test_a_closed_database_refuses_writes_and_reads(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("a"))
    pending = db.defer(insert("b"), 60)
    db.close()  # commits what was deferred first
    await asyncio.wait_for(pending, 10)
    with pytest.raises(RuntimeError):
        await db.transact(insert("c"))
    with pytest.raises(RuntimeError):
        await db.run(lambda c: c.execute("SELECT 1").fetchone())
    conn = sqlite3.connect(tmp_path / "t.db")
    assert sorted(r[0] for r in conn.execute("SELECT v FROM t")) == ["a", "b"]
    conn.close()


def on_thread(value: str) -> Any:
    """A write that also says which thread ran it."""

    def write(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
        return threading.get_ident()

    return write


async def test_an_inline_write_commits_on_the_callers_thread_with_the_deferred_ones_before_it(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("warm"))
    db.transactions = 0
    later = db.defer(insert("deferred"), 60)
    assert await db.transact(on_thread("now"), inline=True) == threading.get_ident()
    assert later.done()  # it rode along, in the same transaction
    assert later.exception() is None
    assert db.transactions == 1
    assert await db.run(lambda c: [r[0] for r in c.execute("SELECT v FROM t ORDER BY id")]) == [
        "warm",
        "deferred",
        "now",
    ]
    db.close()


async def test_an_inline_write_waits_its_turn_behind_work_already_handed_to_the_writer(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("warm"))
    release = threading.Event()

    def slow_read(conn: sqlite3.Connection) -> int:
        release.wait(10)
        return int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])

    read = asyncio.ensure_future(db.run(slow_read))
    await asyncio.sleep(0.05)  # the writer is in the read
    write = asyncio.ensure_future(db.transact(on_thread("after"), inline=True))
    await asyncio.sleep(0.05)
    assert not write.done()  # not run beside the writer, nor ahead of what was asked first
    release.set()
    assert await asyncio.wait_for(read, 10) == 1  # the read saw the database as it was asked
    assert await asyncio.wait_for(write, 10) != threading.get_ident()  # the writer ran it
    db.close()


async def test_a_failing_inline_write_fails_alone_and_the_deferred_writes_with_it_commit(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("taken"))
    later = db.defer(insert("deferred"), 60)
    with pytest.raises(sqlite3.IntegrityError):
        await db.transact(insert("taken"), inline=True)
    await asyncio.wait_for(later, 10)
    assert await db.run(lambda c: sorted(r[0] for r in c.execute("SELECT v FROM t"))) == ["deferred", "taken"]
    assert await db.transact(insert("next"), inline=True)  # the connection is free again
    db.close()


async def test_slow_commits_send_inline_writes_back_to_the_writer_thread(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (v) VALUES (hex(randomblob(8)))")
        threading.Event().wait(0.01)  # a disk whose fsync takes 10 ms

    for _ in range(20):
        await db.transact(slow)
    assert await db.transact(on_thread("then"), inline=True) != threading.get_ident()
    db.close()


async def test_a_write_lock_held_elsewhere_never_holds_the_event_loop(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "t.db", schema=SCHEMA)
    await db.transact(insert("warm"))
    other = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing (the shipper, an operator's sqlite3)
    write = asyncio.ensure_future(db.transact(on_thread("waits"), inline=True))
    before = time.monotonic()
    await asyncio.sleep(0.05)  # the loop runs on: the writer thread is the one waiting for the lock
    assert time.monotonic() - before < 5  # a liveness bound: not the 10 s a statement waits for a lock
    assert not write.done()
    other.execute("COMMIT")
    other.close()
    assert await asyncio.wait_for(write, 10) != threading.get_ident()
    db.close()
