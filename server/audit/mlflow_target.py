"""The MLflow side of the audit trail: the experiment, writing planned traces, searching them.

Blocking (the MLflow client is synchronous): the shipper calls it from its own worker thread, never
from the request path. MLflow is imported lazily because importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from server.audit.checkpoints import Checkpoint, parse
from server.audit.mlflow_sql import SqliteTraceWriter
from server.audit.search import AuditQuery
from server.audit.traces import SpanPlan, TracePlan, otel_trace_id

log = structlog.get_logger("castellan.audit.mlflow")

# The shipper retries with its own backoff; MLflow's own HTTP retries (7, exponential) would hold
# its thread for minutes while the server is down, and its timeout is two minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


TOO_LARGE_STATUSES = frozenset({408, 413, 504})
"""A tracking server's answers that say the request, not the server, was the problem."""


class BatchTooLarge(Exception):
    """The tracking server timed out on a batch or refused its size: a smaller batch may pass. The
    batch may still have been written (a timeout says nothing): re-shipping it upserts the same traces."""


def local_tracking_uri(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'mlflow.db').resolve()}"


class MlflowTarget:
    """Writes traces to one experiment of one tracking store (local SQLite, server or Databricks)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._checkpoint_id: str | None = None
        self._client: Any = None
        self._log_spans = True
        self._routes: dict[str, str] = {}
        self._sql: dict[str, SqliteTraceWriter] = {}
        self.compress = False
        """gzip each OTLP request (no gain on loopback, where it only costs CPU: bench/results/shipping.md)."""

    def experiment_id(self) -> str:
        """The experiment's id, created when missing (resolved once, at start-up)."""
        if self._experiment_id is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
            found = client.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage != "active":
                raise RuntimeError(f"MLflow experiment {self.experiment!r} is deleted; restore it or pick another")
            self._experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            log.info(
                "mlflow_experiment",
                tracking_uri=self.tracking_uri,
                experiment=self.experiment,
                experiment_id=self._experiment_id,
            )
        return self._experiment_id

    @property
    def is_local(self) -> bool:
        """A store on this machine (an SQLite file) rather than a tracking server."""
        return self.tracking_uri.startswith("sqlite:")

    @property
    def checkpoint_experiment(self) -> str:
        return f"{self.experiment}-checkpoints"

    def _checkpoint_experiment_id(self) -> str:
        if self._checkpoint_id is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
            found = client.get_experiment_by_name(self.checkpoint_experiment)
            self._checkpoint_id = found.experiment_id if found else client.create_experiment(self.checkpoint_experiment)
        return self._checkpoint_id

    def write_checkpoints(self, checkpoints: Sequence[Checkpoint]) -> None:
        """One small trace per signed checkpoint, in the `<experiment>-checkpoints` experiment: a copy
        of the chain's heads off the gateway's disk. Idempotent (the trace id derives from the MAC)."""
        if not checkpoints:
            return
        self._write_plans(self._checkpoint_experiment_id(), [_checkpoint_plan(cp) for cp in checkpoints])

    def read_checkpoints(self) -> list[Checkpoint]:
        """The checkpoints shipped to MLflow (for `castellan audit verify --mlflow`)."""
        from mlflow.tracking import MlflowClient

        found = MlflowClient(self.tracking_uri).get_experiment_by_name(self.checkpoint_experiment)
        if found is None:
            return []
        client, token, result = self._tracing(), None, []
        while True:
            page = client.search_traces(
                locations=[found.experiment_id], max_results=500, page_token=token, include_spans=False
            )
            for trace in page:
                doc = trace.info.tags.get("castellan.checkpoint")
                if doc:
                    with contextlib.suppress(ValueError):
                        parsed, _ = parse(doc)
                        result += parsed
            token = page.token
            if not token:
                return result

    def prune(self, max_age_seconds: float | None, max_traces: int | None) -> int:
        """Deletes traces older than `max_age_seconds` and the oldest beyond `max_traces`, in both
        experiments; returns how many. Freed pages of an SQLite store are reused, so it stops growing."""
        client, deleted = self._tracing(), 0
        ids = [self.experiment_id()]
        with contextlib.suppress(Exception):
            ids.append(self._checkpoint_experiment_id())
        for experiment_id in ids:
            if max_age_seconds:
                cutoff = int((time.time() - max_age_seconds) * 1000)
                deleted += int(client.delete_traces(experiment_id, max_timestamp_millis=cutoff) or 0)
            if max_traces:
                excess = self._count(experiment_id) - max_traces
                if excess > 0:
                    deleted += int(
                        client.delete_traces(
                            experiment_id, max_timestamp_millis=int(time.time() * 1000), max_traces=excess
                        )
                        or 0
                    )
        return deleted

    def _count(self, experiment_id: str) -> int:
        if not self.is_local:
            return 0
        import sqlite3

        path = self.tracking_uri.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM trace_info WHERE experiment_id = ?", (int(experiment_id),)
            ).fetchone()
        return int(row[0])

    def _tracing(self) -> Any:
        if self._client is None:
            from mlflow.tracing.client import TracingClient

            self._client = TracingClient(self.tracking_uri)
        return self._client

    def write(self, plans: Sequence[TracePlan]) -> None:
        """Writes the traces; returns only once the store confirmed every one (raises otherwise).
        Idempotent: a trace written again is upserted under the same id."""
        if plans:
            self._write_plans(self.experiment_id(), plans)

    def _route(self, experiment_id: str) -> str:
        """How this store takes a batch, chosen by measurement (bench/audit.py): `sql` (rows straight
        into a local SQLite store, ~0.1 ms a trace), `otlp` (one protobuf request to a tracking
        server's `/v1/traces`), else MLflow's client (`log_spans`, one trace at a time if refused)."""
        route = self._routes.get(experiment_id)
        if route is None:
            if self.is_local:
                writer = SqliteTraceWriter.open(self.tracking_uri, experiment_id)
                if writer is not None:
                    self._sql[experiment_id] = writer
            route = (
                "sql"
                if experiment_id in self._sql
                else "otlp"
                if self.tracking_uri.startswith(("http://", "https://"))
                else "client"
            )
            self._routes[experiment_id] = route
            log.info("mlflow_trace_route", tracking_uri=self.tracking_uri, experiment_id=experiment_id, route=route)
        return route

    def _write_plans(self, experiment_id: str, plans: Sequence[TracePlan]) -> None:
        route = self._route(experiment_id)
        if route == "sql":
            self._sql[experiment_id].write(plans)
            return
        client = self._tracing()
        if route == "otlp":
            from mlflow.exceptions import MlflowException

            from server.audit import otlp  # protobuf: imported by the shipper only

            try:
                otlp.post(
                    client.store.get_host_creds(), experiment_id, otlp.export_request(plans), compress=self.compress
                )
                return
            except MlflowException as exc:
                if exc.get_http_status_code() not in (404, 405, 501):  # type: ignore[no-untyped-call]
                    raise
                self._routes[experiment_id] = "client"  # a server without OTLP ingestion (before 3.4)
        built = [(_trace_info(p, experiment_id), _spans(p)) for p in plans]
        if self._log_spans:
            try:
                # One request for the whole batch: spans, and the trace's tags, user and session
                # from the root span's attributes.
                client.log_spans(experiment_id, [s for _, spans in built for s in spans])
                return
            except NotImplementedError:
                self._log_spans = False  # an old server or Databricks: one trace at a time below
        from mlflow.entities import TraceData

        for info, spans in built:
            returned = client.start_trace(info)
            client._upload_trace_data(returned, TraceData(spans=spans))

    def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        """Calls matching `query`, newest first, from the traces (the central store)."""
        client = self._tracing()
        from server.audit.mlflow_search import metadata_filters, tag_filters

        if query.outcome == "unfinished":
            raise ValueError("unfinished calls are not shipped until they end: search the outbox")
        if query.group is not None:
            raise ValueError("a group filter searches the outbox (MLflow's traces are not tagged with groups)")
        clauses = [f"tags.`castellan.{key}` = '{_quote(value)}'" for key, value in tag_filters(query).items()]
        clauses += [f"metadata.`{key}` = '{_quote(value)}'" for key, value in metadata_filters(query).items()]
        if query.flag:
            clauses.append(f"tags.`castellan.flags` LIKE '%{_quote(query.flag)}%'")
        if query.since:
            clauses.append(f"trace.timestamp_ms >= {_millis(query.since)}")
        if query.until:
            clauses.append(f"trace.timestamp_ms < {_millis(query.until)}")
        wanted = query.offset + query.limit
        results: list[dict[str, Any]] = []
        token = None
        while True:  # reason text is not searchable in MLflow: filtered here, so more pages may be needed
            page = client.search_traces(
                locations=[self.experiment_id()],
                filter_string=" AND ".join(clauses) or None,
                max_results=min(500, max(wanted, 1)),
                order_by=["timestamp_ms DESC"],
                page_token=token,
                include_spans=False,
            )
            for trace in page:
                row = _row(trace.info)
                if query.reason and query.reason.lower() not in " ".join(row["reasons"]).lower():
                    continue
                results.append(row)
            token = page.token
            if not token or len(results) >= wanted:
                break
        return results[query.offset : wanted]


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _millis(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def _row(info: Any) -> dict[str, Any]:
    from server.audit.mlflow_search import identity

    tags, meta = info.tags, info.trace_metadata
    who = identity(tags, meta)
    return {
        "call_id": tags.get("castellan.call_id") or info.client_request_id,
        "trace_id": info.trace_id,
        "time": datetime.fromtimestamp(info.request_time / 1000).astimezone().isoformat(),
        "agent_id": who["agent_id"],
        **{key: tags.get(f"castellan.{key}") for key in ("subject", "tool", "decision", "stage", "policy_version")},
        "run_id": who["run_id"],
        "reasons": json.loads(tags.get("castellan.reasons") or meta.get("castellan.reasons") or "[]"),
        "state": str(info.state),
    }


def _trace_info(plan: TracePlan, experiment_id: str) -> Any:
    from mlflow.entities import TraceInfo, TraceLocation, TraceState

    return TraceInfo(
        trace_id=plan.trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=plan.start_ns // 1_000_000,
        execution_duration=max(0, (plan.end_ns - plan.start_ns) // 1_000_000),
        state=TraceState.OK if plan.ok else TraceState.ERROR,
        request_preview=plan.request_preview,
        response_preview=plan.response_preview,
        client_request_id=plan.call_id,
        trace_metadata=dict(plan.metadata),
        tags={"mlflow.traceName": plan.spans[0].name, **plan.tags},
    )


def _spans(plan: TracePlan) -> list[Any]:
    from mlflow.entities import Span
    from mlflow.entities.span_status import SpanStatus, SpanStatusCode
    from mlflow.tracing.constant import SpanAttributeKey
    from mlflow.tracing.utils import build_otel_context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan

    root_id = plan.otel_trace_id & 0xFFFF_FFFF_FFFF_FFFF or 1
    spans = []
    for index, sp in enumerate(plan.spans):
        span_id = root_id if index == 0 else (root_id + index) & 0xFFFF_FFFF_FFFF_FFFF or 1
        attributes: dict[str, str] = {
            SpanAttributeKey.REQUEST_ID: json.dumps(plan.trace_id),
            SpanAttributeKey.SPAN_TYPE: json.dumps(sp.span_type),
        }
        if sp.inputs is not None:
            attributes[SpanAttributeKey.INPUTS] = json.dumps(sp.inputs, default=str)
        if sp.outputs is not None:
            attributes[SpanAttributeKey.OUTPUTS] = json.dumps(sp.outputs, default=str)
        for key, value in (sp.attributes or {}).items():
            if value is not None:
                attributes[key] = json.dumps(value, default=str)
        if index == 0:
            for key, value in plan.tags.items():
                attributes[f"mlflow.traceTag.{key}"] = json.dumps(value)
            attributes["user.id"] = json.dumps(plan.metadata.get("mlflow.trace.user", ""))
            attributes["session.id"] = json.dumps(plan.metadata.get("mlflow.trace.session", ""))
        status = SpanStatus(SpanStatusCode.OK if sp.ok else SpanStatusCode.ERROR)
        otel = ReadableSpan(
            name=sp.name,
            context=build_otel_context(plan.otel_trace_id, span_id),
            parent=build_otel_context(plan.otel_trace_id, root_id) if index else None,
            start_time=sp.start_ns,
            end_time=sp.end_ns,
            attributes=attributes,
            status=status.to_otel_status(),
            resource=Resource.get_empty(),
        )
        spans.append(Span(otel))
    return spans


def _checkpoint_plan(cp: Checkpoint) -> TracePlan:
    """A checkpoint as a one-span trace; the whole signed line is a tag, so it can be checked later."""
    start = int(cp.time * 1e9)
    tags = {
        "castellan.checkpoint": cp.line(),
        "castellan.checkpoint.kind": cp.kind,
        "castellan.checkpoint.seq": str(cp.seq),
        "castellan.checkpoint.head": cp.head,
    }
    root = SpanPlan(
        name=f"audit checkpoint {cp.seq}", span_type="UNKNOWN", start_ns=start, end_ns=start + 1000, ok=True
    )
    return TracePlan(
        call_id=f"checkpoint-{cp.mac}",
        otel_trace_id=otel_trace_id(f"checkpoint-{cp.mac}"),
        start_ns=start,
        end_ns=start + 1000,
        ok=True,
        tags=tags,
        metadata={"castellan.reasons": "[]", "castellan.traceparent": ""},
        request_preview=f"{cp.kind} {cp.seq}",
        response_preview=cp.head,
        spans=(root,),
    )
