"""Shipping to an `mlflow server`, measured where the time goes: the server's own CPU per trace for
each way of writing a batch, beside the local store, in one run. Writes bench/results/shipping.{json,md}.

- One OTLP request per batch to `/v1/traces` (the only batched trace write MLflow 3.17 has: its
  client's `log_spans` posts the same request; `start_trace` is one request per trace and puts the
  spans in an artifact), the trace as a root span and one span per stage (`audit.mlflow_spans =
  "stages"`) or as its root span alone (`"call"`), with today's tags and with the tags a trace had
  before session 6 (agent, run, action, empty reasons: a merge each per trace on the server); the
  server with 1 and 2 workers, fed by 1 or 2 shippers' worth of concurrent requests.
- The real shipper (outbox read, trace plans, the write, marking shipped) into the server and into
  the local store, both span forms: calls/s, its CPU per call, lost and duplicated calls.

- Sustained shipping: the real shipper over calls already waiting, into a local store that already
  holds `--stored` traces (20,000), with uuid4 call ids and time-ordered ones (`new_call_id`), and
  into an `mlflow server`: calls/s, CPU per call, lost and duplicated calls.

    .venv/bin/python -m bench.shipping [--traces 600] [--only sustain]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.audit import arrived, check, decision, fill, group_cpu, outcome
from server.audit import otlp
from server.audit.keys import ChainKey
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.outbox import PendingCall, SqliteOutbox
from server.audit.shipper import Shipper
from server.audit.traces import TracePlan, as_one_span, new_call_id, plan_trace
from server.metrics import Metrics
from server.settings import AuditSettings
from tests.gateway_process import free_port
from tests.mlflow_server import MlflowServer

RESULTS = Path(__file__).parent / "results"
BATCH = 100


async def planned(root: Path, calls: int, spans: str, tags: str = "now") -> list[TracePlan]:
    key = ChainKey.generate()
    path = root / f"plans-{uuid.uuid4().hex[:8]}.db"
    await fill(path, key, calls)
    outbox = SqliteOutbox(path, key=key)
    pending = await outbox.pending(calls)
    await outbox.close()
    plans = [plan_trace(p) for p in pending]
    plans = [as_one_span(p) for p in plans] if spans == "call" else plans
    return [with_old_tags(p) for p in plans] if tags == "before" else plans


def with_old_tags(plan: TracePlan) -> TracePlan:
    """The trace with the tags it carried before session 6 (agent, run, action and an empty reasons
    list as tags too), to measure what the tags cost the server in the same run."""
    old = {
        "castellan.agent_id": plan.metadata["mlflow.trace.user"],
        "castellan.run_id": plan.metadata["mlflow.trace.session"],
        "castellan.action": "call",
        "castellan.reasons": plan.metadata["castellan.reasons"],
    }
    return replace(plan, tags={**plan.tags, **old})


def ingest(server: MlflowServer, plans: list[TracePlan], streams: int, compress: bool) -> dict[str, Any]:
    """Posts `plans` in batches of BATCH from `streams` threads; the server's CPU per trace."""
    assert server.process is not None
    experiment = f"ingest-{uuid.uuid4().hex[:8]}"
    target = MlflowTarget(server.url, experiment)
    experiment_id = target.experiment_id()
    creds = target._tracing().store.get_host_creds()
    otlp.post(creds, experiment_id, otlp.export_request(plans[:BATCH]), compress=compress)  # warm-up
    batches = [plans[i : i + BATCH] for i in range(BATCH, len(plans), BATCH)]
    body_bytes = sum(len(otlp.export_request(b)) for b in batches[:1])

    def send(batch: list[TracePlan]) -> None:
        otlp.post(creds, experiment_id, otlp.export_request(batch), compress=compress)

    server_cpu, started, client_cpu = group_cpu(server.process.pid), time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(send, batches))
    wall, client_cpu = time.perf_counter() - started, time.process_time() - client_cpu
    server_cpu = group_cpu(server.process.pid) - server_cpu
    traces = sum(len(b) for b in batches)
    got = arrived(server.url, experiment)
    ids = [p.call_id for p in plans]
    return {
        "traces": traces,
        "spans_per_trace": len(plans[0].spans),
        "request_kb": round(body_bytes / 1024, 1),
        "calls_per_s": traces / wall,
        "server_cpu_ms_per_trace": server_cpu / traces * 1e3,
        "client_cpu_ms_per_trace": client_cpu / traces * 1e3,
        "lost": len(set(ids) - set(got)),
        "duplicated": len(got) - len(set(got)),
    }


async def ship(root: Path, uri: str, calls: int, spans: str, batch: int, label: str, pid: int | None) -> dict[str, Any]:
    """The real shipper's loop in this process, as bench.audit measures it, in the given span form."""
    key = ChainKey.generate()
    experiment = f"ship-{uuid.uuid4().hex[:8]}"
    ids = await fill(root / f"{experiment}.db", key, calls)
    settings = AuditSettings(ship_batch=batch, mlflow_spans=spans)  # type: ignore[arg-type]
    row = await ship_all(root / f"{experiment}.db", key, ids, uri, experiment, settings, pid)
    return {"target": label, "spans": spans, **row}


async def ship_all(
    path: Path, key: ChainKey, ids: list[str], uri: str, experiment: str, settings: AuditSettings, pid: int | None
) -> dict[str, Any]:
    """The real shipper's loop over the outbox at `path` until nothing is left, into `experiment` at
    `uri`: calls shipped, calls/s, its CPU per call and the server's (`pid`'s), loss and duplicates."""
    outbox = SqliteOutbox(path, key=key)
    target = MlflowTarget(uri, experiment)
    await asyncio.to_thread(target.experiment_id)
    shipper = Shipper(outbox, target, settings, Metrics())
    server0 = group_cpu(pid) if pid else 0.0
    cpu, started, shipped = time.process_time(), time.perf_counter(), 0
    while got := await shipper.ship_once():
        shipped += got
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    server_cpu = group_cpu(pid) - server0 if pid else None
    await shipper.stop(drain_seconds=0)
    result = {
        "calls": shipped,
        "calls_per_s": shipped / wall,
        "shipper_cpu_ms_per_call": cpu / max(shipped, 1) * 1e3,
        "server_cpu_ms_per_call": server_cpu / max(shipped, 1) * 1e3 if server_cpu is not None else None,
        **check(ids, await asyncio.to_thread(arrived, uri, experiment), outbox),
    }
    await outbox.close()
    return result


def prefill(uri: str, traces: int, ordered: bool) -> None:
    """`traces` earlier calls' traces in another experiment of the store: the B-trees a new trace goes
    into are the size they are after weeks of calls (the local store keeps 200,000 by default)."""
    target = MlflowTarget(uri, "earlier")
    experiment_id = target.experiment_id()
    made = [(new_call_id() if ordered else uuid.uuid4().hex) for _ in range(traces)]
    for start in range(0, traces, 1000):
        plans = [plan_trace(PendingCall(c, [1, 2], decision(c, i), 0.0, outcome(c, i)))
                 for i, c in enumerate(made[start : start + 1000])]  # fmt: skip
        target._write_plans(experiment_id, plans)


async def sustain(root: Path, uri: str, calls: int, batch: int, label: str, ordered: bool,
                  server_pid: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The real shipper's loop (outbox read, plans, write, marked shipped) over `calls` waiting calls,
    batches of `batch`, as fast as it goes: the calls/s it sustains, its CPU per call, loss and
    duplicates (every call id searched back through MLflow's client)."""
    key, experiment = ChainKey.generate(), f"sustain-{uuid.uuid4().hex[:8]}"
    made = [new_call_id() if ordered else uuid.uuid4().hex for _ in range(calls)]
    ids = await fill(root / f"{experiment}.db", key, calls, made)
    row = await ship_all(
        root / f"{experiment}.db", key, ids, uri, experiment, AuditSettings(ship_batch=batch), server_pid
    )
    return {"target": label, "call_ids": "time-ordered" if ordered else "uuid4", "batch": batch, **row}


async def run_sustain(root: Path, calls: int, stored: int, server_calls: int) -> list[dict[str, Any]]:
    """Sustained shipping into a local store already holding `stored` traces (uuid4 and time-ordered
    call ids, interleaved, each into its own copy), then into an `mlflow server` (SQLite backend)."""
    import shutil

    rows = []
    stores = {}
    for ordered in (False, True):
        home = root / f"store-{'ordered' if ordered else 'uuid4'}"
        home.mkdir()
        await asyncio.to_thread(prefill, local_tracking_uri(home), stored, ordered)
        stores[ordered] = home
    for round_ in range(2):
        for ordered in (False, True):
            home = root / f"run-{round_}-{ordered}"
            home.mkdir()
            shutil.copy(stores[ordered] / "mlflow.db", home / "mlflow.db")
            row = await sustain(root, local_tracking_uri(home), calls, 1000,
                                f"local store ({stored:,} traces before)", ordered)  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(home)
    server = await asyncio.to_thread(with_server, root, 1)
    try:
        assert server.process is not None
        for ordered in (False, True):
            row = await sustain(root, server.url, server_calls, BATCH, "mlflow server (1 worker, SQLite)", ordered,
                                server.process.pid)  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.stop()
    return rows


def with_server(root: Path, workers: int) -> MlflowServer:
    home = root / f"mlflow-{workers}-{uuid.uuid4().hex[:6]}"
    home.mkdir()
    server = MlflowServer(home, free_port(), workers=workers)
    server.start(600)
    return server


async def run(root: Path, traces: int, ship_calls: int, local_calls: int) -> dict[str, Any]:
    configs = [  # (spans, tags, workers, streams, gzip)
        ("stages", "before", 1, 1, False),
        ("stages", "now", 1, 1, False),
        ("call", "before", 1, 1, False),
        ("call", "now", 1, 1, False),
        ("call", "now", 2, 2, False),
    ]
    ingestion = []
    servers: dict[int, MlflowServer] = {}
    try:
        for spans, tags, workers, streams, compress in configs:
            if workers not in servers:
                servers[workers] = await asyncio.to_thread(with_server, root, workers)
            # Fresh calls for every row: a trace id already stored (in any experiment) is an update.
            plans = await planned(root, traces + BATCH, spans, tags)
            try:
                row = await asyncio.to_thread(ingest, servers[workers], plans, streams, compress)
            except Exception as exc:  # a configuration the server cannot take is a finding, not the end
                row = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            row.update(spans=spans, tags=tags, tags_per_trace=len(plans[0].tags), workers=workers, streams=streams,
                       gzip=compress)  # fmt: skip
            print(json.dumps(row), flush=True)
            ingestion.append(row)
        server = servers[1]
        assert server.process is not None
        shipping = []
        for spans in ("stages", "call"):
            shipping.append(await ship(root, server.url, ship_calls, spans, BATCH, "mlflow server (1 worker)",
                                       server.process.pid))  # fmt: skip
            print(json.dumps(shipping[-1]), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    local = local_tracking_uri(root)
    for spans in ("stages", "call"):
        shipping.append(await ship(root, local, local_calls, spans, 1000, "local store (SQLite)", None))
        print(json.dumps(shipping[-1]), flush=True)
    return {"ingestion": ingestion, "shipping": shipping}


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Shipping to an mlflow server: where the time goes",
        "",
        f"`python -m bench.shipping` ({meta['time']}); {meta['cpus']} cores shared with other work, load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after: compare rows within this run. "
        f"Batches of {BATCH} calls to the server; each call as the gateway writes it.",
        "",
        "Server ingestion of one OTLP request per batch (`/v1/traces`), server CPU from /proc (all its processes):",
        "",
        "| spans | tags | castellan tags/trace | spans/trace | request KiB | gzip | server workers "
        "| concurrent requests | traces | calls/s | server CPU ms/trace | sender CPU ms/trace | lost | duplicated |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['spans']} | {r.get('tags', 'now')} | | | | {'yes' if r['gzip'] else 'no'} | {r['workers']} "
            f"| {r['streams']} | failed: {r['error']} | | | | | |"
            if "error" in r
            else f"| {r['spans']} | {r.get('tags', 'now')} | {r.get('tags_per_trace', '')} | {r['spans_per_trace']} "
            f"| {r['request_kb']} | {'yes' if r['gzip'] else 'no'} "
            f"| {r['workers']} | {r['streams']} | {r['traces']} | {r['calls_per_s']:.0f} "
            f"| {r['server_cpu_ms_per_trace']:.2f} | {r['client_cpu_ms_per_trace']:.2f} | {r['lost']} "
            f"| {r['duplicated']} |"
            for r in result["ingestion"]
        ),
        "",
        "The shipper end to end (outbox read, plans, write, marked shipped; in-process; 100 calls a batch to "
        "the server, 1,000 into the local store):",
        "",
        "| target | spans | calls | calls/s | shipper CPU ms/call | server CPU ms/call | lost | duplicated | chain |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        *(
            f"| {s['target']} | {s['spans']} | {s['calls']} | {s['calls_per_s']:.0f} "
            f"| {s['shipper_cpu_ms_per_call']:.3f} "
            f"| {'n/a' if s['server_cpu_ms_per_call'] is None else format(s['server_cpu_ms_per_call'], '.2f')} "
            f"| {s['lost']} | {s['duplicated']} | {'intact' if s['chain_intact'] else 'BROKEN'} |"
            for s in result["shipping"]
        ),
        "",
    ]
    if result.get("sustain"):
        sm = result.get("sustain_meta", meta)
        lines += [
            f"Sustained shipping (`--only sustain`, {sm['time']}, load average {sm['load_before'][0]:.1f} before, "
            f"{sm['load_after'][0]:.1f} after): the real shipper's loop over calls already waiting in the outbox, "
            "as fast as it goes, into a store that already holds many traces and into an `mlflow server`; "
            "every call searched back through MLflow's client. Call ids as the gateway made them "
            "(uuid4) and time-ordered (`new_call_id`, whose trace ids sort by time):",
            "",
            "| target | call ids | batch | calls | calls/s | shipper CPU ms/call | server CPU ms/call | lost "
            "| duplicated | chain |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
            *(
                f"| {s['target']} | {s['call_ids']} | {s['batch']} | {s['calls']} | {s['calls_per_s']:.0f} "
                f"| {s['shipper_cpu_ms_per_call']:.3f} "
                f"| {'n/a' if s['server_cpu_ms_per_call'] is None else format(s['server_cpu_ms_per_call'], '.2f')} "
                f"| {s['lost']} | {s['duplicated']} | {'intact' if s['chain_intact'] else 'BROKEN'} |"
                for s in result["sustain"]
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=600, help="traces per ingestion row")
    parser.add_argument("--ship-calls", type=int, default=400)
    parser.add_argument("--local-calls", type=int, default=3000)
    parser.add_argument("--only", choices=("sustain",), help="run one section; the others keep their last results")
    parser.add_argument("--sustain-calls", type=int, default=5000, help="calls per sustained run into the local store")
    parser.add_argument("--stored", type=int, default=20_000, help="traces in the local store before it")
    parser.add_argument("--server-sustain-calls", type=int, default=300)
    args = parser.parse_args()
    import tempfile

    load_before = os.getloadavg()
    previous = RESULTS / "shipping.json"
    with tempfile.TemporaryDirectory(prefix="castellan-shipping-") as tmp:
        if args.only == "sustain":
            result = json.loads(previous.read_text()) if previous.exists() else {"ingestion": [], "shipping": []}
            result["sustain"] = asyncio.run(
                run_sustain(Path(tmp), args.sustain_calls, args.stored, args.server_sustain_calls)
            )
        else:
            result = asyncio.run(run(Path(tmp), args.traces, args.ship_calls, args.local_calls))
            result["sustain"] = asyncio.run(
                run_sustain(Path(tmp), args.sustain_calls, args.stored, args.server_sustain_calls)
            )
    meta = {
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["sustain_meta"] = meta
    if args.only is None:
        result["meta"] = meta
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shipping.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "shipping.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
