"""Audit costs, in one run: the outbox's cost per call on the request path, and the shipper's sustained
calls/s and CPU per call into a local MLflow store and into a real `mlflow server`, with a loss and
duplicate check of what arrived. Writes bench/results/audit.{json,md}.

- Outbox: decision + outcome per call, both committed before the response (the old path, and what
  `audit.outcome_commit_seconds = 0` keeps), against the decision committed and the outcome
  group-committed off the response path (the default). CPU per call, latency, commits (each commit
  is one fsync of the WAL at synchronous=FULL) per call.
- Shipping: MLflow's client (`log_spans`, the old route) in-process as the baseline, then the routes
  the shipper picks (rows into the local store, one OTLP request per batch to the server), both
  in-process and as the real `castellan ship` process (its CPU from /proc), on calls of the shape a
  gateway writes (a root span and one per pipeline stage).

    .venv/bin/python -m bench.audit [--calls 2000] [--ship-calls 3000] [--server-calls 600] [--baseline-calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import percentile
from server.audit.keys import KEY_ENV, ChainKey
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.outbox import SqliteOutbox
from server.audit.ship_process import SETTINGS_ENV
from server.audit.shipper import Shipper
from server.metrics import Metrics
from server.settings import AuditSettings
from tests.gateway_process import free_port
from tests.mlflow_server import MlflowServer

RESULTS = Path(__file__).parent / "results"
STAGES = ("authenticate", "resolve", "admit", "grants", "validate", "policy", "record", "invoke", "obligations",
          "charge", "audit")  # fmt: skip
TIMINGS = {stage: 0.05 for stage in STAGES}


def decision(call_id: str, i: int) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "request_id": f"req-{i}",
        "client": {"name": "bench", "version": "1", "user_agent": "bench/1", "address": "127.0.0.1"},
        "time": datetime.now(UTC).isoformat(),  # recent: the local store's retention keeps it
        "action": "call",
        "agent_id": f"agent-{i % 7}",
        "subject": "bench",
        "groups": ["analysts"],
        "tool": "echo",
        "securable": "main.tools.echo",
        "arguments": {"text": f"call {i}"},
        "run_id": "bench",
        "run_depth": 0,
        "decision": "allow",
        "reasons": [],
        "policy_version": "bench",
        "policy_engine": "embedded",
        "obligations": {},
        "grants": ["EXECUTE"],
        "timings_ms": dict(list(TIMINGS.items())[:7]),
    }


def outcome(call_id: str, i: int) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "is_error": False,
        "result_preview": f"call {i}",
        "result_chars": 8,
        "tokens_in": 7,
        "tokens_out": 3,
        "latency_ms": 2.5,
        "timings_ms": TIMINGS,
        "flags": [],
        "injection_markers": [],
    }


def count_commits(outbox: SqliteOutbox) -> Callable[[], int]:
    """Counts the outbox's write transactions (each one commit, one WAL fsync at synchronous=FULL)."""
    db = outbox._db
    apply, count = db._apply, [0]

    def counted(fns: list[Any]) -> Any:
        count[0] += 1
        return apply(fns)

    db._apply = counted  # type: ignore[method-assign]
    return lambda: count[0]


async def outbox_cost(root: Path, name: str, deferred: bool, calls: int) -> dict[str, Any]:
    """Per call: the decision (awaited, durable) and the outcome (awaited, or written later)."""
    outbox = SqliteOutbox(root / f"{name}.db", key=ChainKey.generate(), outcome_commit_seconds=0.2 if deferred else 0)
    commits = count_commits(outbox)

    async def one(i: int) -> float:
        call_id = uuid.uuid4().hex
        started = time.perf_counter()
        await outbox.write("decision", call_id, decision(call_id, i))
        if deferred:
            outbox.write_later("outcome", call_id, outcome(call_id, i))
        else:
            await outbox.write("outcome", call_id, outcome(call_id, i))
        return time.perf_counter() - started

    for i in range(50):
        await one(i)
    cpu, before = time.process_time(), commits()
    sequential = [await one(i) for i in range(calls)]
    c1_cpu, c1_commits = time.process_time() - cpu, commits() - before
    queue = list(range(calls))
    concurrent: list[float] = []

    async def worker() -> None:
        while queue:
            concurrent.append(await one(queue.pop()))

    cpu, before, started = time.process_time(), commits(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(16)))
    wall = time.perf_counter() - started
    c16_cpu, c16_commits = time.process_time() - cpu, commits() - before
    await outbox.close()
    return {
        "path": name,
        "calls": calls,
        "c1_p50_us": percentile(sequential, 0.5) * 1e6,
        "c1_p99_us": percentile(sequential, 0.99) * 1e6,
        "c1_cpu_us_per_call": c1_cpu / calls * 1e6,
        "c1_commits_per_call": c1_commits / calls,
        "c16_p50_us": percentile(concurrent, 0.5) * 1e6,
        "c16_calls_per_s": calls / wall,
        "c16_cpu_us_per_call": c16_cpu / calls * 1e6,
        "c16_commits_per_call": c16_commits / calls,
    }


async def fill(path: Path, key: ChainKey, calls: int, call_ids: list[str] | None = None) -> list[str]:
    """An outbox with `calls` finished calls (decision + outcome each), written 16 at a time, oldest
    first; `call_ids` their ids (default: uuid4, as the gateway made them before session 8)."""
    outbox = SqliteOutbox(path, key=key, outcome_commit_seconds=0.05)
    ids = call_ids if call_ids is not None else [uuid.uuid4().hex for _ in range(calls)]
    queue = list(enumerate(ids))
    queue.reverse()  # popped oldest first, so the outbox holds them in the order they were made

    async def worker() -> None:
        while queue:
            i, call_id = queue.pop()
            await outbox.write("decision", call_id, decision(call_id, i))
            outbox.write_later("outcome", call_id, outcome(call_id, i))

    await asyncio.gather(*(worker() for _ in range(16)))
    await outbox.close()
    return ids


def arrived(tracking_uri: str, experiment: str) -> list[str]:
    """The call id of every trace in the experiment (one entry per trace: a duplicate would repeat)."""
    from mlflow.tracing.client import TracingClient
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    client, token, ids = TracingClient(tracking_uri), None, []
    while True:
        page = client.search_traces(locations=[found.experiment_id], max_results=500, page_token=token,
                                    include_spans=False)  # fmt: skip
        ids += [t.info.tags.get("castellan.call_id") or t.info.client_request_id for t in page]
        token = page.token
        if not token:
            return ids


def check(ids: list[str], got: list[str], outbox: SqliteOutbox) -> dict[str, Any]:
    verification = outbox.verify()
    return {
        "lost": len(set(ids) - set(got)),
        "duplicated": len(got) - len(set(got)),
        "unexpected": len(set(got) - set(ids)),
        "chain_intact": verification.intact,
    }


def unshipped(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox WHERE shipped_at IS NULL").fetchone()[0])
    finally:
        conn.close()


def batch_for(uri: str) -> int:
    """Up to 1,000 calls a batch into the local store; 100 (the default) to a server, whose ingestion
    takes ~15 ms a trace: a batch of 1,000 would outlast the 15 s request timeout."""
    return 1000 if uri.startswith("sqlite") else 100


async def ship_in_process(root: Path, uri: str, route: str | None, calls: int, label: str) -> dict[str, Any]:
    """The shipper's own loop in this process: calls/s and CPU per call (outbox reads, trace plans,
    the write, marking shipped); `route` forces MLflow's client for the baseline."""
    key = ChainKey.generate()
    experiment = f"bench-{uuid.uuid4().hex[:8]}"
    ids = await fill(root / f"{experiment}.db", key, calls)
    outbox = SqliteOutbox(root / f"{experiment}.db", key=key)
    target = MlflowTarget(uri, experiment)
    experiment_id = await asyncio.to_thread(target.experiment_id)
    if route is not None:
        target._routes[experiment_id] = route
    shipper = Shipper(outbox, target, AuditSettings(ship_batch=batch_for(uri)), Metrics())
    cpu, started, shipped = time.process_time(), time.perf_counter(), 0
    while batch := await shipper.ship_once():
        shipped += batch
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await shipper.stop(drain_seconds=0)
    result = {
        "target": label,
        "route": target._routes.get(experiment_id),
        "process": "in-process",
        "calls": shipped,
        "calls_per_s": shipped / wall,
        "shipper_cpu_ms_per_call": cpu / max(shipped, 1) * 1000,
        **check(ids, await asyncio.to_thread(arrived, uri, experiment), outbox),
    }
    await outbox.close()
    return result


def start_shipper(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "server", "ship"], env=env, stdout=out, stderr=subprocess.STDOUT)


async def drained(audit_db: Path, deadline: float) -> None:
    """Until nothing in the outbox is unshipped (bounded by `deadline`)."""
    while unshipped(audit_db) and time.monotonic() < deadline:  # noqa: ASYNC110 - another process ships
        await asyncio.sleep(0.05)


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu(pid: int) -> float:
    """CPU seconds of a process group (the mlflow server and its workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pid:
                    total += process_cpu(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return total


async def ship_process(root: Path, uri: str, calls: int, label: str, server_pid: int | None = None) -> dict[str, Any]:
    """`castellan ship` as the gateway runs it: warmed up on a first batch, then `calls` more
    written into its outbox; calls/s from the first write to the last shipped, its CPU from /proc."""
    key, data = ChainKey.generate(), root / f"ship-{uuid.uuid4().hex[:8]}"
    data.mkdir()
    experiment = f"bench-{data.name}"
    audit_db = data / "audit.db"
    warm = await fill(audit_db, key, 50)
    settings = AuditSettings(mlflow_tracking_uri=uri, mlflow_experiment=experiment, ship_batch=batch_for(uri),
                             ship_interval_seconds=0.1)  # fmt: skip
    env = {
        **os.environ,
        SETTINGS_ENV: json.dumps(
            {"data_dir": str(data), "audit_db": str(audit_db), "audit": settings.model_dump(mode="json")}
        ),
        KEY_ENV: key.secret.decode(),
    }
    process = start_shipper(env, data / "ship.log")
    try:
        deadline = time.monotonic() + 900
        await drained(audit_db, deadline)
        cpu, server_cpu, started = process_cpu(process.pid), group_cpu(server_pid or -1), time.perf_counter()
        ids = await fill(audit_db, key, calls)
        await drained(audit_db, deadline)
        wall = time.perf_counter() - started
        cpu, server_cpu = process_cpu(process.pid) - cpu, group_cpu(server_pid or -1) - server_cpu
    finally:
        process.terminate()
        process.wait(timeout=60)
    outbox = SqliteOutbox(audit_db, key=key)
    result = {
        "target": label,
        "route": "sql" if uri.startswith("sqlite") else "otlp",
        "process": "castellan ship",
        "calls": calls,
        "calls_per_s": calls / wall,
        "shipper_cpu_ms_per_call": cpu / calls * 1000,
        **({"server_cpu_ms_per_call": server_cpu / calls * 1000} if server_pid else {}),
        **check(warm + ids, await asyncio.to_thread(arrived, uri, experiment), outbox),
    }
    await outbox.close()
    return result


async def run(calls: int, ship_calls: int, server_calls: int, baseline_calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writes = [
            await outbox_cost(root, "both awaited (before)", False, calls),
            await outbox_cost(root, "outcome group-committed (now)", True, calls),
        ]
        local = local_tracking_uri(root)
        shipping = [
            await ship_in_process(root, local, "client", baseline_calls, "local store (SQLite)"),
            await ship_in_process(root, local, None, ship_calls, "local store (SQLite)"),
            await ship_process(root, local, ship_calls, "local store (SQLite)"),
        ]
        server = MlflowServer(root / "mlflow", free_port())
        (root / "mlflow").mkdir()
        try:
            await asyncio.to_thread(server.start, 600)  # a loaded machine can take minutes
            assert server.process is not None
            label = "mlflow server (SQLite, 1 worker)"
            shipping += [
                await ship_in_process(root, server.url, "client", baseline_calls, label),
                await ship_in_process(root, server.url, None, baseline_calls, label),
                await ship_process(root, server.url, server_calls, label, server.process.pid),
            ]
        finally:
            server.stop()
    return {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "outbox": writes, "shipping": shipping}


def ship_row(s: dict[str, Any]) -> str:
    server = f"{s['server_cpu_ms_per_call']:.2f}" if "server_cpu_ms_per_call" in s else "n/a"
    return (
        f"| {s['target']} | {s['route']} | {s['process']} | {s['calls']} | {s['calls_per_s']:.0f} | "
        f"{s['shipper_cpu_ms_per_call']:.3f} | {server} | {s['lost']} | {s['duplicated']} | "
        f"{'intact' if s['chain_intact'] else 'BROKEN'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--ship-calls", type=int, default=3000)
    parser.add_argument("--server-calls", type=int, default=600)
    parser.add_argument("--baseline-calls", type=int, default=200)
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = asyncio.run(run(args.calls, args.ship_calls, args.server_calls, args.baseline_calls))
    result["load_average_before"] = load_before
    lines = [
        "# Audit: the outbox on the request path, and shipping to MLflow",
        "",
        f"Load average {load_before[0]:.1f} at the start, {result['load_average'][0]:.1f} at the end, on "
        f"{result['cpus']} cores shared with other work: compare rows within this run.",
        "",
        "Outbox per call (decision committed before the tool runs; outcome as said), WAL + synchronous=FULL:",
        "",
        "| path | c=1 p50 µs | c=1 p99 µs | c=1 CPU µs/call | commits (fsyncs)/call c=1 | c=16 p50 µs | c=16 calls/s "
        "| c=16 CPU µs/call | commits/call c=16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {w['path']} | {w['c1_p50_us']:.0f} | {w['c1_p99_us']:.0f} | {w['c1_cpu_us_per_call']:.0f} | "
            f"{w['c1_commits_per_call']:.2f} | {w['c16_p50_us']:.0f} | {w['c16_calls_per_s']:.0f} | "
            f"{w['c16_cpu_us_per_call']:.0f} | {w['c16_commits_per_call']:.3f} |"
            for w in result["outbox"]
        ),
        "",
        "Shipper, sustained (batches of up to 1,000 calls into the local store, 100 to the server; each call a "
        "trace of 12 spans; confirmed before marked "
        "shipped). Lost / duplicated: outbox calls missing from, or repeated in, the experiment afterwards; chain: "
        "`verify` of the outbox after shipping.",
        "",
        "| target | route | shipper | calls | calls/s | shipper CPU ms/call | server CPU ms/call | lost | duplicated "
        "| chain |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
        *(ship_row(s) for s in result["shipping"]),
    ]
    markdown = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "audit.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
