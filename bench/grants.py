"""The grants stage's cost per call with a warm cache (local catalog), against the same stage with the
cache disabled (every requirement read from SQLite). Writes bench/results/grants.{json,md}.

    .venv/bin/python -m bench.grants [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.stats import percentile
from server.demo import seed_demo_grants
from server.grants.cache import CachedGrants
from server.grants.local import LocalCatalog
from server.grants.stage import GrantsStage
from tests.fakes.backends import make_call, make_identity
from tools.echo import EchoTool

RESULTS = Path(__file__).parent / "results"


async def measure(stage: GrantsStage, calls: int) -> list[float]:
    call = make_call(tool=EchoTool(), tool_name="echo", arguments={"text": "x"}, identity=make_identity())
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await stage.run(call)
        latencies.append(time.perf_counter() - started)
    return latencies


async def run(calls: int) -> list[dict[str, float | str | int]]:
    with tempfile.TemporaryDirectory() as tmp:
        catalog = LocalCatalog(Path(tmp) / "catalog.db")
        catalog.add_securable("FUNCTION", "main.tools.echo")
        seed_demo_grants(catalog)
        rows: list[dict[str, float | str | int]] = []
        for label, ttl in (("warm cache (ttl 30 s)", 30.0), ("no cache (every call reads SQLite)", 0.0)):
            stage = GrantsStage(CachedGrants(catalog, ttl=ttl))
            await measure(stage, 200)
            latencies = await measure(stage, calls if ttl else calls // 10)
            rows.append(
                {
                    "stage": label,
                    "calls": len(latencies),
                    "p50_us": percentile(latencies, 0.5) * 1e6,
                    "p99_us": percentile(latencies, 0.99) * 1e6,
                }
            )
        await catalog.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    rows = asyncio.run(run(parser.parse_args().calls))
    lines = ["| grants stage | calls | p50 µs | p99 µs |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['calls']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} |" for r in rows]
    markdown = "# Grants stage cost per call (3 requirements: USE CATALOG, USE SCHEMA, EXECUTE)\n\n" + "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grants.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "grants.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
