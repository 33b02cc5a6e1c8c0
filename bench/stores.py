"""CPU per governed call of the durable stores, by thread: the audit outbox (a decision written and
awaited, the previous call's outcome deferred, as the record and audit stages do) and the in-memory
meter (admit then settle).

    .venv/bin/python -m bench.stores [--calls 2000]

Thread CPU (time.thread_time) is steadier than wall clock on a loaded machine: compare two trees by
running this in each, interleaved. The writer thread's figure includes the kernel's work for the
fsync of each commit (synchronous=FULL).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from server.audit.keys import ChainKey
from server.audit.outbox import SqliteOutbox
from server.call import RunInfo
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Admission
from server.settings import Limits
from server.sqlite import SqliteDatabase
from tests.fakes.backends import make_identity

RECORD = {
    "tool": "echo",
    "arguments": {"text": "hello world"},
    "decision": "allow",
    "reasons": [],
    "agent_id": "bench-agent",
    "timings_ms": {"admit": 0.1, "policy": 0.2},
}


async def outbox_cpu(root: Path, calls: int) -> tuple[float, float, int]:
    """(event-loop thread us/call, writer thread us/call, transactions) for `calls` governed calls."""
    writer_cpu = 0.0
    transactions = 0
    apply = SqliteDatabase._apply

    def timed(self: SqliteDatabase, fns: list[Any]) -> list[tuple[bool, Any]]:
        nonlocal writer_cpu, transactions
        started = time.thread_time()
        try:
            return apply(self, fns)
        finally:
            writer_cpu += time.thread_time() - started
            transactions += 1

    outbox = SqliteOutbox(root / "audit.db", key=ChainKey.generate(), checkpoint_seconds=0, outcome_commit_seconds=0.2)
    await outbox.write("decision", "warm", RECORD)
    SqliteDatabase._apply = timed  # type: ignore[method-assign]
    try:
        started = time.thread_time()
        for i in range(calls):
            outbox.write_later("outcome", f"c{i - 1}", RECORD)
            await outbox.write("decision", f"c{i}", RECORD)
        loop_cpu = time.thread_time() - started
    finally:
        SqliteDatabase._apply = apply  # type: ignore[method-assign]
    await outbox.close()
    return loop_cpu / calls * 1e6, writer_cpu / calls * 1e6, transactions


async def meter_cpu(root: Path, calls: int) -> tuple[float, float]:
    """(event-loop thread us per admit + settle, writer thread us per call for the write-behind)
    with every limit off but the counting."""
    limits = Limits(
        calls_per_minute=0,
        tokens_per_day=0,
        max_run_calls=0,
        max_repeats=0,
        concurrent_calls=0,
        max_identical_calls=0,
        max_calls_per_tool=0,
    )
    agent = make_identity(agent_id="bench-agent")
    meter = BufferedSqliteMeter(root / "meters.db", write_behind_seconds=0.1)
    await meter.start()
    writer_cpu = 0.0
    apply = SqliteDatabase._apply

    def timed(self: SqliteDatabase, fns: list[Any]) -> list[tuple[bool, Any]]:
        nonlocal writer_cpu
        started = time.thread_time()
        try:
            return apply(self, fns)
        finally:
            writer_cpu += time.thread_time() - started

    tickets = [Admission(f"k{i % 50}", limits, 50, uuid.uuid4().hex, 60, "echo") for i in range(calls)]
    SqliteDatabase._apply = timed  # type: ignore[method-assign]
    try:
        started = time.thread_time()
        for i, ticket in enumerate(tickets):
            await meter.admit(agent, RunInfo(run_id=f"r{i // 20}"), ticket)
            await meter.settle(agent, ticket.reservation, 40)
            if i % 10 == 9:  # about a flush interval's worth of calls at the gateway's rate
                await meter.flush()
        used = time.thread_time() - started
    finally:
        SqliteDatabase._apply = apply  # type: ignore[method-assign]
    await meter.close()
    return used / calls * 1e6, writer_cpu / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loop_us, writer_us, transactions = asyncio.run(outbox_cpu(Path(tmp), args.calls))
        meter_us, meter_writer_us = asyncio.run(meter_cpu(Path(tmp), args.calls))
    print(
        f"outbox, per call: event loop {loop_us:.0f} us, writer thread {writer_us:.0f} us, "
        f"{transactions / args.calls:.2f} transactions"
    )
    print(
        f"meter (in memory), admit + settle: {meter_us:.1f} us; its write-behind (a flush every 10 calls),"
        f" writer thread {meter_writer_us:.1f} us per call"
    )


if __name__ == "__main__":
    main()
