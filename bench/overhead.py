"""Overhead of governance: the same `echo` tool direct vs behind Castellan (every stage on, embedded
defaults), driven by the same client in the same run, interleaved, in both protocol eras (2026-07-28
stateless, and a 2025-11-25 session). Reports latency and calls/s ratios, and the gateway's CPU per
call from its process's CPU time: its own, and with its shipper's once that has gone quiet (the
shipper ships what the round left behind). Prints a table and writes bench/results/overhead.{json,md}.

    .venv/bin/python -m bench.overhead [--calls 2000] [--rounds 3] [--era 2026|2025|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.load import Era, Sample, drive
from bench.peers import quiesce, root_cpu, tree_cpu
from tests.gateway_process import free_port, run_gateway

RESULTS = Path(__file__).parent / "results"
UNLIMITED = {
    "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
    "CASTELLAN_METERING__LIMITS__TOKENS_PER_DAY": "0",
    "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
    "CASTELLAN_METERING__LIMITS__CONCURRENT_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
    "CASTELLAN_LOG_LEVEL": "warning",
    "CASTELLAN_AUDIT__SHIP": "true",  # every stage on, the shipper included (its own process)
}


def start_direct() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.direct_server", str(port)])
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=1)
        except urllib.error.HTTPError:
            return proc, url  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("direct server did not start")


def merge(samples: list[Sample]) -> Sample:
    return Sample(
        [x for s in samples for x in s.latencies], sum(s.seconds for s in samples), sum(s.errors for s in samples)
    )


async def measure(
    direct_url: str, gateway_url: str, token: str, calls: int, rounds: int, eras: tuple[Era, ...], gateway_pid: int
) -> list[dict[str, Any]]:
    rows = []
    for era in eras:
        for concurrency in (1, 16, 64):
            await drive(direct_url, None, 200, concurrency, era=era)  # warm-up
            await drive(gateway_url, token, 200, concurrency, era=era)
            await quiesce([gateway_pid])
            direct, gateway = [], []
            own = total = 0.0
            for _ in range(rounds):  # interleaved, so drift on the machine hits both alike
                direct.append(await drive(direct_url, None, calls, concurrency, era=era))
                own_before, total_before = root_cpu([gateway_pid]), tree_cpu([gateway_pid])
                gateway.append(await drive(gateway_url, token, calls, concurrency, era=era))
                own += root_cpu([gateway_pid]) - own_before
                await quiesce([gateway_pid])  # the shipper finishes what this round left it
                total += tree_cpu([gateway_pid]) - total_before
            d, g = merge(direct), merge(gateway)
            rows.append(
                {
                    "era": era,
                    "concurrency": concurrency,
                    "calls": len(g.latencies),
                    "direct_p50_ms": d.percentile(0.5) * 1e3,
                    "direct_p99_ms": d.percentile(0.99) * 1e3,
                    "direct_cps": d.calls_per_second,
                    "gateway_p50_ms": g.percentile(0.5) * 1e3,
                    "gateway_p99_ms": g.percentile(0.99) * 1e3,
                    "gateway_cps": g.calls_per_second,
                    "p50_ratio": g.percentile(0.5) / d.percentile(0.5),
                    "cps_ratio": g.calls_per_second / d.calls_per_second,
                    "gateway_cpu_ms": own / len(g.latencies) * 1e3,
                    "with_shipper_cpu_ms": total / len(g.latencies) * 1e3,
                    "errors": d.errors + g.errors,
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| era | conc | direct p50 ms | direct p99 ms | direct calls/s | gateway p50 ms | gateway p99 ms "
        "| gateway calls/s | p50 b/a | calls/s b/a | gateway CPU ms/call | + shipper | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['era']} | {r['concurrency']} | {r['direct_p50_ms']:.2f} | {r['direct_p99_ms']:.2f} "
            f"| {r['direct_cps']:.0f} | {r['gateway_p50_ms']:.2f} | {r['gateway_p99_ms']:.2f} | {r['gateway_cps']:.0f} "
            f"| {r['p50_ratio']:.2f} | {r['cps_ratio']:.2f} | {r['gateway_cpu_ms']:.2f} "
            f"| {r['with_shipper_cpu_ms']:.2f} | {r['errors']} |"
        )
    return "\n".join(lines)


def stage_costs(base_url: str) -> list[dict[str, Any]]:
    """Per-stage p50/p99 from the gateway's own Prometheus histograms (bucket upper bounds)."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=5).read().decode()
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("castellan_stage_seconds_bucket{"):
            labels, value = line.split("} ")
            stage = labels.split('stage="')[1].split('"')[0]
            le = labels.split('le="')[1].split('"')[0]
            buckets.setdefault(stage, []).append((float(le), float(value)))
    rows = []
    for stage, points in buckets.items():
        points.sort()
        total = points[-1][1]
        if not total:
            continue

        def quantile(q: float, points: list[tuple[float, float]] = points, total: float = total) -> float:
            return next(le for le, count in points if count >= q * total)

        rows.append(
            {"stage": stage, "count": int(total), "p50_ms_le": quantile(0.5) * 1e3, "p99_ms_le": quantile(0.99) * 1e3}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and concurrency level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--era", choices=("2026", "2025", "both"), default="both")
    args = parser.parse_args()
    eras: tuple[Era, ...] = ("2026", "2025") if args.era == "both" else (args.era,)
    load_at_start = [round(x, 2) for x in __import__("os").getloadavg()]
    direct_proc, direct_url = start_direct()
    try:
        with tempfile.TemporaryDirectory() as tmp, run_gateway(Path(tmp), UNLIMITED) as gw:
            token = gw.token("bench-agent", ["analysts"])
            rows = asyncio.run(measure(direct_url, gw.mcp_url, token, args.calls, args.rounds, eras, gw.process.pid))
            stages = stage_costs(gw.base_url)
    finally:
        direct_proc.terminate()
        direct_proc.wait()
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "eras": list(eras),
        "load_average_start": load_at_start,
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (RESULTS / "overhead.json").write_text(json.dumps({"meta": meta, "overhead": rows, "stages": stages}, indent=2))
    stage_table = "\n".join(
        ["| stage | calls | p50 ≤ ms | p99 ≤ ms |", "|---|---:|---:|---:|"]
        + [f"| {s['stage']} | {s['count']} | {s['p50_ms_le']:.3f} | {s['p99_ms_le']:.3f} |" for s in stages]
    )
    markdown = (
        f"# Overhead: direct MCP server (a) vs behind Castellan (b)\n\n{json.dumps(meta)}\n\n{table(rows)}\n\n"
        f"## Stage costs (gateway histograms, bucket upper bounds)\n\n{stage_table}\n"
    )
    (RESULTS / "overhead.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
