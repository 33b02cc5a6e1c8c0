"""Cost of admit + settle per call, SQLite against Redis (a real redis-server on loopback), one run.
Writes bench/results/metering.{json,md}.

    .venv/bin/python -m bench.metering [--calls 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.stats import percentile
from server.call import RunInfo
from server.metering.meter import Admission, Meter
from server.metering.redis import RedisMeter
from server.metering.sqlite import SqliteMeter
from server.settings import Limits
from server.testing import make_identity
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


async def measure(name: str, meter: Meter, calls: int) -> dict[str, Any]:
    for _ in range(200):
        await one(meter, "warm")
    latencies = [await one(meter, "seq") for _ in range(calls)]
    started = time.perf_counter()
    queue = list(range(calls))

    async def worker() -> None:
        while queue:
            queue.pop()
            await one(meter, "conc")

    await asyncio.gather(*(worker() for _ in range(16)))
    throughput = calls / (time.perf_counter() - started)
    return {
        "store": name,
        "calls": calls,
        "p50_us": percentile(latencies, 0.5) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "calls_per_s_c16": throughput,
    }


async def run(calls: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, run_redis() as redis:
        for name, meter in (("sqlite", SqliteMeter(Path(tmp) / "m.db")), ("redis", RedisMeter(redis.url))):
            rows.append(await measure(name, meter, calls))
            await meter.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    rows = asyncio.run(run(parser.parse_args().calls))
    lines = [
        "| store | calls | admit+settle p50 µs | p99 µs | calls/s at concurrency 16 |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['store']} | {r['calls']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['calls_per_s_c16']:.0f} |"
        for r in rows
    ]
    markdown = "# Metering: admit + settle per call\n\n" + "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metering.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "metering.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
