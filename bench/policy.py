"""Decision latency per policy engine option, side by side in one run, for the default policy: the
embedded engine with each evaluator (the OPA library: OPA's own evaluator in-process; regorus, the
fallback without Go), schema validation included, and a real OPA server over loopback (aiohttp,
pooled). Writes bench/results/policy.{json,md}.

    .venv/bin/python -m bench.policy [--decisions 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile
from server.policy import inprocess_opa
from server.policy._input import build_input
from server.policy.bundle import PolicyBundle
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import PolicyEngine
from server.policy.opa import OpaServerEngine
from server.settings import REPO_ROOT
from server.testing import make_call
from tests.opa import run_opa
from tools.echo import EchoTool

RESULTS = Path(__file__).parent / "results"


async def sequential(engine: PolicyEngine, docs: list[dict[str, Any]]) -> list[float]:
    latencies = []
    for doc in docs:
        started = time.perf_counter()
        decision = await engine.decide(doc)
        latencies.append(time.perf_counter() - started)
        assert decision.allow, decision.reasons
    return latencies


async def concurrent(engine: PolicyEngine, docs: list[dict[str, Any]], concurrency: int) -> float:
    """Decisions per second with `concurrency` callers."""
    queue = list(docs)

    async def worker() -> None:
        while queue:
            await engine.decide(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(docs) / (time.perf_counter() - started)


async def run(decisions: int) -> list[dict[str, Any]]:
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    docs = [
        build_input(make_call(tool=EchoTool(), tool_name="echo", arguments={"text": f"hello {i}"}))
        for i in range(decisions)
    ]
    rows = []
    with run_opa() as opa:
        options: list[tuple[str, PolicyEngine]] = []
        if inprocess_opa.available():
            options.append(("embedded (opa-library)", EmbeddedEngine(bundle, evaluator="opa-library")))
        options.append(("embedded (regorus)", EmbeddedEngine(bundle, evaluator="regorus")))
        options.append(("opa (loopback)", OpaServerEngine(opa.url, bundle=bundle)))
        for _, engine in options:
            await sequential(engine, docs[:500])  # warm-up (and the OPA push)
        for label, engine in options:
            latencies = await sequential(engine, docs)
            rows.append(
                {
                    "engine": label,
                    "decisions": len(latencies),
                    "p50_us": percentile(latencies, 0.5) * 1e6,
                    "p99_us": percentile(latencies, 0.99) * 1e6,
                    "per_second_c16": await concurrent(engine, docs, 16),
                }
            )
        for _, engine in options:
            await engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=5000)
    args = parser.parse_args()
    rows = asyncio.run(run(args.decisions))
    lines = ["| engine | decisions | p50 µs | p99 µs | decisions/s at concurrency 16 |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['engine']} | {r['decisions']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['per_second_c16']:.0f} |"
        for r in rows
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    markdown = "# Policy decision latency, default policy, one run\n\n" + "\n".join(lines) + "\n"
    markdown += f"\nLoad average after the run (1, 5, 15 min): {load} on {os.cpu_count()} cores.\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "policy.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
