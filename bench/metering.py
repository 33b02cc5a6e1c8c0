"""Cost of admit + settle per call, in one run: the SQLite meter held in memory with write-behind (the
default), the write-through SQLite meter (before; `metering.write_behind_seconds = 0`) and Redis (a
real redis-server on loopback). Latency, calls/s at concurrency 16, CPU per call of this process
(every thread: the database thread's work included), transactions per call, and an exactness check:
16 concurrent clients against a token budget, charged == what was served and never over the budget.
Writes bench/results/metering.{json,md}.

    .venv/bin/python -m bench.metering [--calls 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import percentile
from server.call import RunInfo
from server.errors import Denied
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Admission, Meter
from server.metering.redis import RedisMeter
from server.metering.sqlite import SqliteMeter
from server.settings import Limits
from tests.fakes.backends import make_identity
from tests.redis_server import run_redis

RESULTS = Path(__file__).parent / "results"
LIMITS = Limits(
    calls_per_minute=0,
    tokens_per_day=10**12,
    concurrent_calls=0,
    max_run_calls=0,
    max_repeats=0,
    max_identical_calls=0,
    max_calls_per_tool=0,
)


async def one(meter: Meter, agent: str) -> float:
    identity = make_identity(agent_id=agent)
    ticket = Admission(uuid.uuid4().hex, LIMITS, 500, uuid.uuid4().hex, 60)
    started = time.perf_counter()
    await meter.admit(identity, RunInfo(run_id=ticket.reservation), ticket)
    await meter.settle(identity, ticket.reservation, 300)
    return time.perf_counter() - started


def count_transactions(meter: Meter) -> Callable[[], int]:
    """Write transactions of a SQLite meter (0 for Redis: one round trip per admit and per settle)."""
    db = getattr(meter, "_db", None)
    if db is None:
        return lambda: 0
    apply, count = db._apply, [0]

    def counted(fns: list[Any]) -> Any:
        count[0] += 1
        return apply(fns)

    db._apply = counted
    return lambda: count[0]


async def exact(meter: Meter) -> dict[str, Any]:
    """16 clients race for a 100,000-token day budget: nothing charged beyond it, nothing lost."""
    limits = Limits(**{**LIMITS.model_dump(), "tokens_per_day": 100_000})
    identity, served, denied = make_identity(agent_id=f"exact-{uuid.uuid4().hex[:6]}"), [], [0]

    async def client(n: int) -> None:
        for _ in range(40):
            ticket = Admission(uuid.uuid4().hex, limits, 500, uuid.uuid4().hex, 60)
            try:
                await meter.admit(identity, RunInfo(run_id=ticket.reservation), ticket)
            except Denied:
                denied[0] += 1
                continue
            await asyncio.sleep(0)
            await meter.settle(identity, ticket.reservation, 300 + n)
            served.append(300 + n)

    await asyncio.gather(*(client(n) for n in range(16)))
    usage = await meter.usage(identity.agent_id, limits)
    charged = next(w.used for w in usage.tokens if w.window == "day")
    return {"budget": 100_000, "charged": charged, "served_tokens": sum(served), "denied": denied[0],
            "exact": charged == sum(served) <= 100_000 and usage.in_flight == 0}  # fmt: skip


async def measure(name: str, meter: Meter, calls: int) -> dict[str, Any]:
    await meter.start()
    transactions = count_transactions(meter)
    for _ in range(200):
        await one(meter, "warm")
    cpu, before = time.process_time(), transactions()
    latencies = [await one(meter, "seq") for _ in range(calls)]
    cpu_c1, tx_c1 = time.process_time() - cpu, transactions() - before
    started, cpu = time.perf_counter(), time.process_time()
    queue = list(range(calls))

    async def worker() -> None:
        while queue:
            queue.pop()
            await one(meter, "conc")

    await asyncio.gather(*(worker() for _ in range(16)))
    throughput = calls / (time.perf_counter() - started)
    cpu_c16 = time.process_time() - cpu
    return {
        "store": name,
        "calls": calls,
        "p50_us": percentile(latencies, 0.5) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "cpu_us_per_call_c1": cpu_c1 / calls * 1e6,
        "transactions_per_call_c1": tx_c1 / calls,
        "calls_per_s_c16": throughput,
        "cpu_us_per_call_c16": cpu_c16 / calls * 1e6,
        **await exact(meter),
    }


async def run(calls: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, run_redis() as redis:
        meters: list[tuple[str, Meter]] = [
            ("sqlite, in memory + write-behind (now)", BufferedSqliteMeter(Path(tmp) / "b.db")),
            ("sqlite, write-through (before)", SqliteMeter(Path(tmp) / "m.db")),
            ("redis", RedisMeter(redis.url)),
        ]
        for name, meter in meters:
            rows.append(await measure(name, meter, calls))
            await meter.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    load = os.getloadavg()
    rows = asyncio.run(run(parser.parse_args().calls))
    lines = [
        f"Load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores "
        "shared with other work: compare rows within this run.",
        "",
        "| store | calls | admit+settle p50 µs | p99 µs | CPU µs/call | transactions/call | calls/s at c=16 "
        "| CPU µs/call c=16 | 16 clients vs a budget: charged = served, within it |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['store']} | {r['calls']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['cpu_us_per_call_c1']:.0f} | "
        f"{r['transactions_per_call_c1']:.2f} | {r['calls_per_s_c16']:.0f} | {r['cpu_us_per_call_c16']:.0f} | "
        f"{'yes' if r['exact'] else 'NO'} ({r['charged']} of {r['budget']}, {r['denied']} denied) |"
        for r in rows
    ]
    markdown = "# Metering: admit + settle per call\n\n" + "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metering.json").write_text(json.dumps({"load_average": load, "rows": rows}, indent=2))
    (RESULTS / "metering.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
