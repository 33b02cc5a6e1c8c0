"""Audit costs: the outbox write per call (decision + outcome, durable), and the shipper's sustained
traces/s to MLflow, a local store and a real `mlflow server`, in one run.
Writes bench/results/audit.{json,md}.

    .venv/bin/python -m bench.audit [--calls 2000] [--traces 600]
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
from server.audit.keys import ChainKey
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.outbox import SqliteOutbox
from server.audit.shipper import Shipper
from server.metrics import Metrics
from server.settings import AuditSettings
from tests.mlflow_server import run_mlflow

RESULTS = Path(__file__).parent / "results"


def decision(call_id: str, i: int) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "time": "2026-11-24T09:00:00+00:00",
        "agent_id": f"agent-{i % 7}",
        "subject": "bench",
        "tool": "echo",
        "decision": "allow",
        "reasons": [],
        "arguments": {"text": f"call {i}"},
        "run_id": "bench",
        "policy_version": "bench",
        "timings_ms": {"authenticate": 0.02, "resolve": 0.03, "admit": 0.5, "grants": 0.03, "policy": 0.3},
    }


def outcome(call_id: str, i: int) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "is_error": False,
        "result_preview": f"call {i}",
        "tokens_in": 7,
        "tokens_out": 3,
        "latency_ms": 2.5,
        "timings_ms": {"authenticate": 0.02, "resolve": 0.03, "admit": 0.5, "policy": 0.3, "invoke": 0.1},
    }


async def write_costs(outbox: SqliteOutbox, calls: int) -> dict[str, Any]:
    async def one(i: int) -> float:
        call_id = uuid.uuid4().hex
        started = time.perf_counter()
        await outbox.write("decision", call_id, decision(call_id, i))
        await outbox.write("outcome", call_id, outcome(call_id, i))
        return time.perf_counter() - started

    sequential = [await one(i) for i in range(calls)]
    started = time.perf_counter()
    queue = list(range(calls))
    concurrent: list[float] = []

    async def worker() -> None:
        while queue:
            concurrent.append(await one(queue.pop()))

    await asyncio.gather(*(worker() for _ in range(16)))
    return {
        "calls": calls,
        "c1_p50_us": percentile(sequential, 0.5) * 1e6,
        "c1_p99_us": percentile(sequential, 0.99) * 1e6,
        "c16_p50_us": percentile(concurrent, 0.5) * 1e6,
        "c16_p99_us": percentile(concurrent, 0.99) * 1e6,
        "c16_calls_per_s": calls / (time.perf_counter() - started),
    }


async def ship_rate(outbox: SqliteOutbox, tracking_uri: str, target_name: str) -> dict[str, Any]:
    """Ships everything in `outbox` (the calls written above) and times it, after resolving the experiment."""
    target = MlflowTarget(tracking_uri, "bench-audit")
    await asyncio.to_thread(target.experiment_id)
    shipper = Shipper(outbox, target, AuditSettings(ship_batch=100), Metrics())
    unshipped, _ = await outbox.backlog()
    started = time.perf_counter()
    shipped = 0
    while batch := await shipper.ship_once():
        shipped += batch
    seconds = time.perf_counter() - started
    await shipper.stop(drain_seconds=0)
    return {"target": target_name, "records": unshipped, "traces": shipped, "traces_per_s": shipped / seconds}


async def run(calls: int, traces: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        outbox = SqliteOutbox(root / "audit.db", key=ChainKey.generate())
        writes = await write_costs(outbox, calls)
        await outbox.close()
        shipping = []
        for name in ("local", "server"):
            source = SqliteOutbox(root / f"ship-{name}.db", key=ChainKey.generate())
            for i in range(traces):
                call_id = uuid.uuid4().hex
                await source.write("decision", call_id, decision(call_id, i))
                await source.write("outcome", call_id, outcome(call_id, i))
            if name == "local":
                shipping.append(await ship_rate(source, local_tracking_uri(root), "local store (SQLite)"))
            else:
                with run_mlflow(root / "mlflow") as server:
                    shipping.append(await ship_rate(source, server.url, "mlflow server (SQLite backend)"))
            await source.close()
    return {"outbox_write": writes, "shipping": shipping}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--traces", type=int, default=600)
    args = parser.parse_args()
    result = asyncio.run(run(args.calls, args.traces))
    w = result["outbox_write"]
    lines = [
        "# Audit: outbox write cost and shipping rate",
        "",
        "Outbox write per call (decision + outcome, each committed durably, WAL + synchronous=FULL, group commit):",
        "",
        "| calls | c=1 p50 µs | c=1 p99 µs | c=16 p50 µs | c=16 p99 µs | calls/s at c=16 |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {w['calls']} | {w['c1_p50_us']:.0f} | {w['c1_p99_us']:.0f} | {w['c16_p50_us']:.0f} | "
        f"{w['c16_p99_us']:.0f} | {w['c16_calls_per_s']:.0f} |",
        "",
        "Shipper, sustained (batches of 100 calls, one trace each, confirmed before marking shipped):",
        "",
        "| target | traces | traces/s |",
        "|---|---:|---:|",
        *(f"| {s['target']} | {s['traces']} | {s['traces_per_s']:.1f} |" for s in result["shipping"]),
    ]
    markdown = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "audit.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
