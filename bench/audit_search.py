"""How fast an auditor's `castellan audit search --source mlflow` answers on a store of many calls: a local
MLflow store filled by the real shipper with N calls (seven agents, one call in five denied), then the
CLI run as a user runs it, filtering on agent and decision, timed end to end (process start, MLflow's
import, the query) and the query alone in-process. Writes bench/results/audit_search.{json,md}.

    .venv/bin/python -m bench.audit_search [--calls 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.audit import decision, outcome
from bench.stats import percentile
from server.audit.keys import ChainKey
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.outbox import SqliteOutbox
from server.audit.search import AuditQuery
from server.audit.shipper import Shipper
from server.metrics import Metrics
from server.settings import AuditSettings

RESULTS = Path(__file__).parent / "results"
EXPERIMENT = "castellan-audit"


def _decision(call_id: str, i: int) -> dict[str, Any]:
    record = decision(call_id, i)
    if i % 5 == 0:
        record.update(decision="deny", stage="policy", reasons=[f"tool echo is not allowed for call {i}"])
    return record


async def fill_and_ship(data_dir: Path, key: ChainKey, calls: int) -> float:
    """`calls` calls into the outbox, shipped by the real shipper into the data dir's local store."""
    outbox = SqliteOutbox(data_dir / "audit.db", key=key, outcome_commit_seconds=0.05)
    for start in range(0, calls, 500):
        for i in range(start, min(start + 500, calls)):
            call_id = uuid.uuid4().hex
            await outbox.write("decision", call_id, _decision(call_id, i))
            if i % 5:
                outbox.write_later("outcome", call_id, outcome(call_id, i))
    target = MlflowTarget(local_tracking_uri(data_dir), EXPERIMENT)
    await asyncio.to_thread(target.experiment_id)
    shipper = Shipper(outbox, target, AuditSettings(ship_batch=1000), Metrics())
    started = time.perf_counter()
    while await shipper.ship_once():
        pass
    await shipper.stop(drain_seconds=0)
    await outbox.close()
    return time.perf_counter() - started


def cli_search(data_dir: Path, key_file: Path) -> tuple[float, int]:
    env = {
        **os.environ,
        "CASTELLAN_DATA_DIR": str(data_dir),
        "CASTELLAN_AUDIT__CHAIN_KEY_FILE": str(key_file),
        "CASTELLAN_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "server", "audit", "search", "--source", "mlflow", "--agent", "agent-3",
               "--decision", "deny", "--limit", "50", "--format", "jsonl"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    return time.perf_counter() - started, len(done.stdout.splitlines())


def run(calls: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="castellan-search-") as root:
        data_dir = Path(root)
        key = ChainKey.generate()
        key_file = data_dir / "chain-key"
        key_file.write_bytes(key.secret)
        ship_seconds = asyncio.run(fill_and_ship(data_dir, key, calls))
        target = MlflowTarget(local_tracking_uri(data_dir), EXPERIMENT)
        query = AuditQuery(agent="agent-3", decision="deny", limit=50)
        target.search(query)  # warm: the tracing client and its store
        in_process = []
        for _ in range(repeats):
            started = time.perf_counter()
            found = target.search(query)
            in_process.append(time.perf_counter() - started)
        cli = [cli_search(data_dir, key_file) for _ in range(repeats)]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mlflow.tracing.client"], check=True, timeout=300)
        import_seconds = time.perf_counter() - started
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "calls_in_store": calls,
        "ship_seconds": round(ship_seconds, 2),
        "matches_returned": len(found),
        "cli_rows": cli[0][1],
        "query_in_process_ms_p50": round(percentile(in_process, 50) * 1000, 1),
        "cli_wall_s": [round(c[0], 2) for c in cli],
        "cli_wall_s_p50": round(percentile([c[0] for c in cli], 50), 2),
        "mlflow_tracing_import_s": round(import_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.calls, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit_search.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# `castellan audit search --source mlflow`: an agent's denials on a store of many calls",
        "",
        f"`{json.dumps({k: result[k] for k in ('python', 'cpus', 'load_average', 'time')})}`",
        "",
        "| calls in the store | matches | query in-process p50 ms | CLI end to end p50 s | MLflow import s |",
        "|---:|---:|---:|---:|---:|",
        f"| {result['calls_in_store']} | {result['matches_returned']} | {result['query_in_process_ms_p50']} | "
        f"{result['cli_wall_s_p50']} | {result['mlflow_tracing_import_s']} |",
        "",
    ]
    (RESULTS / "audit_search.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
