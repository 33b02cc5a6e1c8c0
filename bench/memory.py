"""Memory of the gateway: RSS idle, and after 10,000 and 20,000 calls (growth between the two should be
within the caches' bounds). Every stage on at embedded defaults, shipping to the local MLflow store.
Writes bench/results/memory.{json,md}.

    .venv/bin/python -m bench.memory [--calls 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.load import drive
from tests.gateway_process import run_gateway

RESULTS = Path(__file__).parent / "results"
NO_LIMITS = {
    "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
    "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
    "CASTELLAN_METERING__LIMITS__TOKENS_PER_DAY": "0",
    "CASTELLAN_AUDIT__SHIP": "true",
}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children_rss_mb(pid: int) -> float:
    total = 0.0
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for grandchild in child.read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += rss_mb(int(grandchild)) + children_rss_mb(int(grandchild))
    return total


async def run(calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, run_gateway(Path(tmp) / "gw", NO_LIMITS, timeout=60) as gw:
        pid = gw.process.pid
        token = gw.token("memory-bench", ["analysts"])
        await asyncio.sleep(10)  # the shipper's MLflow store is created on start-up
        idle = rss_mb(pid)
        first = await drive(gw.mcp_url, token, calls, 16)
        after_first = rss_mb(pid)
        second = await drive(gw.mcp_url, token, calls, 16)
        after_second = rss_mb(pid)
        return {
            "calls_per_round": calls,
            "idle_rss_mb": round(idle, 1),
            "after_round_1_rss_mb": round(after_first, 1),
            "after_round_2_rss_mb": round(after_second, 1),
            "growth_round_2_mb": round(after_second - after_first, 1),
            "worker_processes_rss_mb": round(children_rss_mb(pid), 1),
            "errors": first.errors + second.errors,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=10_000)
    result = asyncio.run(run(parser.parse_args().calls))
    markdown = "\n".join(
        [
            "# Memory: gateway RSS",
            "",
            "| idle | after 10,000 calls | after 20,000 calls | growth in the second 10,000 | child processes |",
            "|---:|---:|---:|---:|---:|",
            f"| {result['idle_rss_mb']} MB | {result['after_round_1_rss_mb']} MB | {result['after_round_2_rss_mb']} MB "
            f"| {result['growth_round_2_mb']} MB | {result['worker_processes_rss_mb']} MB |",
            "",
            f"Calls per round: {result['calls_per_round']}, concurrency 16, errors: {result['errors']}. RSS of "
            "the gateway process; child processes (measured at the end) are the audit shipper (MLflow's client) "
            "and the catalog functions' sandbox (forkserver).",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "memory.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
