"""Scale-out: one gateway vs two replicas sharing Redis meters and one OPA, driven round-robin by the
same client in the same run; and whether a shared limit stays exact across the replicas.
Writes bench/results/scaleout.{json,md}.

    .venv/bin/python -m bench.scaleout [--calls 3000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import call_body, call_headers
from bench.stats import percentile
from tests.gateway_process import GatewayProcess, run_gateway
from tests.opa import run_opa
from tests.redis_server import run_redis

RESULTS = Path(__file__).parent / "results"


async def round_robin(
    replicas: list[GatewayProcess], tokens: list[str], calls: int, concurrency: int
) -> dict[str, Any]:
    latencies: list[float] = []
    outcomes = {"allowed": 0, "denied": 0}
    counter = iter(range(calls))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            gw, token = replicas[i % len(replicas)], tokens[i % len(replicas)]
            headers = call_headers("echo", token)
            started = time.perf_counter()
            async with session.post(gw.mcp_url, data=call_body("echo", {"text": f"c{i}"}, i), headers=headers) as r:
                result = (await r.json())["result"]
            latencies.append(time.perf_counter() - started)
            outcomes["denied" if result.get("isError") else "allowed"] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "calls_per_s": round(calls / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        **outcomes,
    }


async def run(calls: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, run_redis() as redis, run_opa() as opa, ExitStack() as stack:
        root = Path(tmp)
        limited = calls // 2
        env = {
            "CASTELLAN_METERING__BACKEND": "redis",
            "CASTELLAN_METERING__REDIS_URL": redis.url,
            "CASTELLAN_POLICY__ENGINE": "opa",
            "CASTELLAN_POLICY__OPA_URL": opa.url,
            "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
            "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
            "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
            "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
            "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
            "CASTELLAN_METERING__LIMITS__TOKENS_PER_DAY": "0",
            "CASTELLAN_METERING__AGENTS": json.dumps({"limited": {"calls_per_minute": limited}}),
        }
        first = stack.enter_context(run_gateway(root / "a", env, timeout=60))
        (root / "b").mkdir()
        (root / "b" / "dev-signing-key.json").write_bytes((root / "a" / "dev-signing-key.json").read_bytes())
        second = stack.enter_context(run_gateway(root / "b", env, timeout=60))
        replicas = [first, second]
        tokens = {
            agent: [g.token(agent, ["analysts"]) for g in replicas] for agent in ("bench-1", "bench-2", "limited")
        }
        await round_robin(replicas, tokens["bench-1"], 300, concurrency)  # warm-up
        one = await round_robin([first], tokens["bench-1"][:1], calls, concurrency)
        two = await round_robin(replicas, tokens["bench-2"], calls, concurrency)
        exact = await round_robin(replicas, tokens["limited"], calls, concurrency)
    return {
        "calls": calls,
        "concurrency": concurrency,
        "one_replica": one,
        "two_replicas": two,
        "ratio": round(two["calls_per_s"] / one["calls_per_s"], 2),
        "shared_limit": {"limit": limited, "allowed": exact["allowed"], "denied": exact["denied"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    r = asyncio.run(run(args.calls, args.concurrency))
    one, two, shared = r["one_replica"], r["two_replicas"], r["shared_limit"]
    markdown = "\n".join(
        [
            "# Scale-out: replicas sharing Redis meters and one OPA",
            "",
            f"{r['calls']} calls at concurrency {r['concurrency']}, round robin, same client, same run (2 cores).",
            "",
            "| setup | calls/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|",
            f"| 1 gateway | {one['calls_per_s']} | {one['p50_ms']} | {one['p99_ms']} |",
            f"| 2 gateways | {two['calls_per_s']} | {two['p50_ms']} | {two['p99_ms']} |",
            "",
            f"Throughput ratio 2/1: {r['ratio']}x. Shared limit of {shared['limit']} calls per minute across both "
            f"replicas: {shared['allowed']} allowed, {shared['denied']} denied "
            f"({'exact' if shared['allowed'] == shared['limit'] else 'NOT exact'}).",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaleout.json").write_text(json.dumps(r, indent=2))
    (RESULTS / "scaleout.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
