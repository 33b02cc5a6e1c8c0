"""The buffered SQLite meter: exact in memory, written behind to the meters file, and what a
restart, a crash or a locked file does to the counts."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from server.call import RunInfo
from server.errors import Denied
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Admission
from server.metering.sqlite import SqliteMeter
from server.settings import Limits
from tests.fakes.backends import make_identity

pytestmark = pytest.mark.anyio
AGENT = make_identity(agent_id="buffered-bot")
BUDGET = Limits(
    calls_per_minute=0,
    concurrent_calls=0,
    max_run_calls=0,
    max_repeats=0,
    tokens_per_day=1_000,
    max_identical_calls=0,
    max_calls_per_tool=0,
)


def ticket(estimate: int = 100) -> Admission:
    return Admission(uuid.uuid4().hex, BUDGET, estimate, uuid.uuid4().hex, 60, "echo")


def day_used(path: Path) -> int:
    """What the file says, as `castellan usage` in another process would read it."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM counters WHERE key = ?", (f"tokens:{AGENT.agent_id}:day",)).fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


async def test_settled_tokens_reach_the_file_within_the_interval_and_a_restart_keeps_the_budget(
    tmp_path: Path,
) -> None:
    meter = BufferedSqliteMeter(tmp_path / "meters.db", write_behind_seconds=0.05)
    await meter.start()
    for _ in range(4):
        t = ticket()
        await meter.admit(AGENT, RunInfo(run_id="r"), t)
        await meter.settle(AGENT, t.reservation, 200)
    for _ in range(100):  # bounded: the interval is 0.05 s
        if day_used(tmp_path / "meters.db") == 800:
            break
        await asyncio.sleep(0.02)
    assert day_used(tmp_path / "meters.db") == 800
    await meter.close()
    restarted = BufferedSqliteMeter(tmp_path / "meters.db")
    await restarted.start()
    await restarted.admit(AGENT, RunInfo(run_id="r"), ticket(200))  # 800 + 200 fits
    with pytest.raises(Denied, match="token budget: 800 of 1000"):
        await restarted.admit(AGENT, RunInfo(run_id="r"), ticket(1))  # the reservation counts too
    await restarted.close()
    plain = SqliteMeter(tmp_path / "meters.db")  # the write-through meter reads the same file
    usage = await plain.usage(AGENT.agent_id, BUDGET)
    assert (next(w.used for w in usage.tokens if w.window == "day"), usage.in_flight) == (800, 0)
    await plain.close()


CRASH = """
import asyncio, os, sys, uuid
from pathlib import Path
from server.call import RunInfo
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Admission
from server.settings import Limits
from tests.fakes.backends import make_identity

async def main() -> None:
    meter = BufferedSqliteMeter(Path(sys.argv[1]), write_behind_seconds=0.05)
    await meter.start()
    agent = make_identity(agent_id="buffered-bot")
    limits = Limits(calls_per_minute=0, concurrent_calls=0, max_run_calls=0, max_repeats=0, tokens_per_day=1000,
                    max_identical_calls=0, max_calls_per_tool=0)
    for _ in range(3):
        t = Admission(uuid.uuid4().hex, limits, 100, uuid.uuid4().hex, 600, "echo")
        await meter.admit(agent, RunInfo(run_id="r"), t)
        await meter.settle(agent, t.reservation, 100)
    for _ in range(3):  # in flight when it dies
        await meter.admit(agent, RunInfo(run_id="r"), Admission(uuid.uuid4().hex, limits, 100, uuid.uuid4().hex, 600))
    assert await meter.flush()
    print("flushed", flush=True)
    os.kill(os.getpid(), 9)

asyncio.run(main())
"""


async def test_after_a_sigkill_what_was_flushed_is_kept_and_what_it_held_is_released(tmp_path: Path) -> None:
    path = tmp_path / "meters.db"
    died = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CRASH, str(path)], capture_output=True, text=True, timeout=120
    )
    assert died.returncode == -9, died.stderr
    assert "flushed" in died.stdout
    restarted = BufferedSqliteMeter(path)
    before = await SqliteMeter(path).usage(AGENT.agent_id, BUDGET)
    assert before.in_flight == 3  # the dead process's reservations are in the file
    await restarted.start()  # ... and released at once: its pid is gone
    usage = await restarted.usage(AGENT.agent_id, BUDGET)
    assert (next(w.used for w in usage.tokens if w.window == "day"), usage.in_flight) == (300, 0)
    await restarted.close()


async def test_a_locked_file_delays_the_write_behind_but_loses_and_doubles_nothing(tmp_path: Path) -> None:
    path = tmp_path / "meters.db"
    reports: list[tuple[str, int]] = []
    meter = BufferedSqliteMeter(path, write_behind_seconds=0.05)
    meter.report = lambda what, n: reports.append((what, n))
    await meter.start()
    meter._db.run_sync(lambda c: c.execute("PRAGMA busy_timeout = 0"))
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    for _ in range(3):
        t = ticket()
        await meter.admit(AGENT, RunInfo(run_id="r"), t)  # never waits for the file
        await meter.settle(AGENT, t.reservation, 50)
    for _ in range(200):
        if reports:
            break
        await asyncio.sleep(0.02)
    assert reports[:1] == [("owed", 3)]
    usage = await meter.usage(AGENT.agent_id, BUDGET)
    assert next(w.used for w in usage.tokens if w.window == "day") == 150  # exact meanwhile
    locker.execute("ROLLBACK")
    locker.close()
    for _ in range(200):
        if ("written", 3) in reports:
            break
        await asyncio.sleep(0.05)
    assert reports[-1] == ("written", 3)
    assert sum(n for what, n in reports if what == "owed") == 3  # each settle owed once, however many retries
    assert day_used(path) == 150
    await meter.close()


async def test_a_dead_instance_found_by_the_heartbeat_is_forgotten_in_memory_too(tmp_path: Path) -> None:
    path = tmp_path / "meters.db"
    other = SqliteMeter(path)
    other.instance = dataclasses.replace(other.instance, pid=999_999_999, pid_start="1")
    await other.admit(AGENT, RunInfo(run_id="r"), ticket())  # held by an instance that looks alive by heartbeat
    meter = BufferedSqliteMeter(path, instance_timeout=3600)
    await meter.start()
    assert (await meter.usage(AGENT.agent_id, BUDGET)).in_flight == 0  # its pid is gone: released at start
    await meter.close()
