"""Traces written as rows into a local MLflow store read back, through MLflow's own client, as the
same traces MLflow's `log_spans` writes; written twice they are still one trace each."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.outbox import PendingCall
from server.audit.search import AuditQuery
from server.audit.traces import plan_trace


def pending(call_id: str) -> PendingCall:
    decision = {
        "call_id": call_id,
        "time": "2026-12-01T09:00:00+00:00",
        "agent_id": "rows-bot",
        "subject": "someone",
        "tool": "echo",
        "decision": "allow",
        "reasons": ['a "quoted" reason'],
        "arguments": {"text": "ünïcode ✓ \n", "n": 3},
        "run_id": "run-1",
        "policy_version": "v1",
        "timings_ms": {"authenticate": 0.1, "policy": 0.2, "invoke": 1.0},
    }
    outcome = {"call_id": call_id, "is_error": True, "result_preview": "boom", "tokens_in": 3, "tokens_out": 1,
               "latency_ms": 2.0, "timings_ms": {"authenticate": 0.1, "policy": 0.2, "invoke": 1.0}}  # fmt: skip
    return PendingCall(call_id, [1, 2], decision, 0.0, outcome)


def shape(trace: Any) -> dict[str, Any]:
    tags = {k: v for k, v in trace.info.tags.items() if k.startswith("castellan.")}
    spans = [
        (s.name, s.span_type, s.parent_id is None, str(s.status.status_code), s.inputs, s.outputs, s.start_time_ns,
         s.end_time_ns, {k: v for k, v in s.attributes.items() if k != "mlflow.traceRequestId"})
        for s in trace.data.spans
    ]  # fmt: skip
    return {"state": str(trace.info.state), "tags": tags, "spans": spans, "time": trace.info.request_time}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return local_tracking_uri(tmp_path_factory.mktemp("mlflow"))


def test_rows_read_back_as_the_trace_log_spans_writes(store: str) -> None:
    from mlflow.tracing.client import TracingClient

    rows, client = MlflowTarget(store, "rows"), MlflowTarget(store, "client")
    assert rows._route(rows.experiment_id()) == "sql"
    client._routes[client.experiment_id()] = "client"  # MLflow's own log_spans
    a, b = plan_trace(pending("call-a")), plan_trace(pending("call-b"))
    rows.write([a])
    client.write([b])
    reader = TracingClient(store)
    got, want = shape(reader.get_trace(a.trace_id)), shape(reader.get_trace(b.trace_id))
    want["tags"]["castellan.call_id"] = "call-a"  # the one difference: which call
    for span in want["spans"]:
        if "castellan.call_id" in span[-1]:
            span[-1]["castellan.call_id"] = "call-a"
            span[-1]["mlflow.traceTag.castellan.call_id"] = "call-a"
    assert got == want
    assert got["state"] == "ERROR"  # the outcome was an error


def test_a_batch_written_twice_is_one_trace_per_call(store: str) -> None:
    target = MlflowTarget(store, "twice")
    plans = [plan_trace(pending(f"call-{i}")) for i in range(50)]
    target.write(plans)
    target.write(plans)
    path = Path(store.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as conn:
        experiment = int(target.experiment_id())
        traces = conn.execute("SELECT COUNT(*) FROM trace_info WHERE experiment_id = ?", (experiment,)).fetchone()[0]
        spans = conn.execute("SELECT COUNT(*) FROM spans WHERE experiment_id = ?", (experiment,)).fetchone()[0]
    assert (traces, spans) == (50, 50 * len(plans[0].spans))
    found = {row["call_id"] for row in target.search(AuditQuery(agent="rows-bot", limit=500))}
    assert found >= {f"call-{i}" for i in range(50)}


def test_a_trace_keeps_what_auditors_filter_on_as_tags_and_the_rest_in_its_root_span(store: str) -> None:
    from mlflow.tracing.client import TracingClient

    target = MlflowTarget(store, "schema")
    allowed = pending("call-ok")
    allowed.decision.update(reasons=[], action="call")
    denied = PendingCall(
        "call-no",
        [3],
        {**pending("call-no").decision, "action": "call", "decision": "deny", "stage": "policy", "code": "denied",
         "reasons": ["no EXECUTE"], "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        0.0,
        None,
    )  # fmt: skip
    plans = [plan_trace(allowed), plan_trace(denied)]
    target.write(plans)
    reader = TracingClient(store)
    ok, no = (reader.get_trace(p.trace_id) for p in plans)
    common = {"castellan.call_id", "castellan.subject", "castellan.tool", "castellan.decision",
              "castellan.policy_version", "castellan.outcome"}  # fmt: skip
    assert {k for k in ok.info.tags if k.startswith("castellan.")} == common  # no empty reasons, no action
    assert {k for k in no.info.tags if k.startswith("castellan.")} == common | {
        "castellan.stage", "castellan.reasons", "castellan.traceparent"}  # fmt: skip
    root = next(s for s in no.data.spans if s.parent_id is None)
    assert (root.attributes["castellan.action"], root.attributes["castellan.code"]) == ("call", "denied")
    # the agent and the run are MLflow's user and session, and found by them
    assert (no.info.trace_metadata["mlflow.trace.user"], no.info.trace_metadata["mlflow.trace.session"]) == (
        "rows-bot", "run-1")  # fmt: skip
    rows = {r["call_id"]: r for r in target.search(AuditQuery(agent="rows-bot", run_id="run-1", limit=10))}
    assert (rows["call-ok"]["reasons"], rows["call-no"]["reasons"]) == ([], ["no EXECUTE"])
    assert (rows["call-no"]["agent_id"], rows["call-no"]["run_id"]) == ("rows-bot", "run-1")
    assert target.search(AuditQuery(agent="rows-bot", run_id="run-2")) == []
    assert [r["call_id"] for r in target.search(AuditQuery(reason="execute", limit=10))] == ["call-no"]


def test_a_time_ordered_call_id_gives_a_trace_id_that_sorts_by_time_and_others_keep_theirs() -> None:
    import hashlib
    import time
    import uuid

    from server.audit.traces import new_call_id, trace_id_for

    ids = []
    for _ in range(3):
        ids.append(new_call_id())
        time.sleep(0.002)
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert [trace_id_for(i) for i in ids] == sorted(trace_id_for(i) for i in ids)
    assert all(trace_id_for(i)[3:15] == i[:12] for i in ids)  # the call's time leads its trace id
    assert len({trace_id_for(new_call_id()) for _ in range(1000)}) == 1000
    # any other call id (uuid4 hex, as every call had before) keeps the trace id it always had
    for old in (uuid.uuid4().hex, "c1", "call-a"):
        assert trace_id_for(old) == f"tr-{int.from_bytes(hashlib.sha256(old.encode()).digest()[:16], 'big'):032x}"


def test_time_ordered_traces_read_back_as_the_trace_log_spans_writes(store: str) -> None:
    from mlflow.tracing.client import TracingClient

    from server.audit.traces import new_call_id

    rows, client = MlflowTarget(store, "rows-ordered"), MlflowTarget(store, "client-ordered")
    client._routes[client.experiment_id()] = "client"
    first, second = new_call_id(), new_call_id()
    a, b = plan_trace(pending(first)), plan_trace(pending(second))
    rows.write([a])
    client.write([b])
    reader = TracingClient(store)
    got, want = shape(reader.get_trace(a.trace_id)), shape(reader.get_trace(b.trace_id))
    want["tags"]["castellan.call_id"] = first
    for span in want["spans"]:
        if "castellan.call_id" in span[-1]:
            span[-1]["castellan.call_id"] = first
            span[-1]["mlflow.traceTag.castellan.call_id"] = first
    assert got == want
    assert reader.get_trace(a.trace_id).info.client_request_id == first


def test_a_value_orjson_refuses_is_still_written_and_read_back(store: str) -> None:
    """A lone surrogate (json.loads makes one of `"\\ud800"`) or an integer beyond 64 bits in the
    arguments: encoded by the standard encoder, ASCII-escaped, so the row binds and the batch is not
    stuck (before, the surrogate went into the span's content as it was and SQLite refused the row)."""
    from mlflow.tracing.client import TracingClient

    call = pending("call-odd")
    call.decision["arguments"] = {"text": "a\ud800b", "big": 2**70, "ü": "✓"}
    plan = plan_trace(call)
    target = MlflowTarget(store, "odd")
    target.write([plan])
    trace = TracingClient(store).get_trace(plan.trace_id)
    tool = next(s for s in trace.data.spans if s.name == "tool")
    assert tool.inputs == {"text": "a\ud800b", "big": 2**70, "ü": "✓"}
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.inputs == {"tool": "echo", "arguments": tool.inputs}
