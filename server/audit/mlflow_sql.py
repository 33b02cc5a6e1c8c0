"""Traces written straight into a local MLflow store's tables (SQLite), one transaction per batch.

MLflow's own `log_spans` into a SQLite store goes through SQLAlchemy's ORM, one merge per tag,
metadata entry and span: about 20 ms of CPU per call's trace here, so the shipper could not keep up
with more than ~50 calls/s. These are the same rows (`trace_info`, `trace_tags`,
`trace_request_metadata`, `spans`) that `log_spans` writes, with the same span JSON, upserted with a
few `executemany` statements per batch. It is used only for the schema revision it was written for
(MLflow 3.17, checked at open) and only while MLflow's opt-in SQL trace rollups are off; anything
else goes through MLflow's client. Upserts keyed by trace id: shipping a batch twice writes the same rows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.audit.traces import TracePlan, compact_json

SCHEMA_REVISIONS = frozenset({"dc11669786a5"})
"""The MLflow store schema revisions (alembic) these statements are written for: MLflow 3.17.x."""

_TRACE_INFO = (
    "INSERT INTO trace_info (request_id, experiment_id, timestamp_ms, execution_time_ms, status,"
    " client_request_id, request_preview, response_preview, db_payload_generation, trace_name, session_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT(request_id) DO UPDATE SET"
    " timestamp_ms = excluded.timestamp_ms, execution_time_ms = excluded.execution_time_ms,"
    " status = excluded.status, client_request_id = excluded.client_request_id,"
    " request_preview = excluded.request_preview, response_preview = excluded.response_preview,"
    " trace_name = excluded.trace_name, session_id = excluded.session_id"
)
_TAG = "INSERT OR REPLACE INTO trace_tags (key, value, request_id) VALUES (?, ?, ?)"
_METADATA = "INSERT OR REPLACE INTO trace_request_metadata (key, value, request_id) VALUES (?, ?, ?)"
_SPAN = (
    "INSERT OR REPLACE INTO spans (trace_id, experiment_id, span_id, parent_span_id, name, type, status,"
    " start_time_unix_nano, end_time_unix_nano, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PREVIEW = 1000
_METADATA_KEYS = ("mlflow.trace.user",)
"""What `log_spans` keeps as trace metadata (the rest of the plan's metadata is in the tags and spans;
the session is `trace_info.session_id`, which MLflow reads back as `mlflow.trace.session`)."""
_MAX_TAG = 8000
_string: Callable[[str], str] = json.encoder.encode_basestring
"""A string's JSON (non-ASCII as it is), in C: what every string attribute is."""


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a `sqlite:///…` tracking URI, or None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


class SqliteTraceWriter:
    """Upserts planned traces into one experiment of a local MLflow SQLite store.

    `open` returns None when the store is not one it can write (another schema revision, rollups
    on): the caller then uses MLflow's client. `write` commits a whole batch or nothing (raises
    `sqlite3.Error`), so a batch is marked shipped only once all of it is in the store.
    """

    def __init__(self, path: Path, experiment_id: str, artifact_location: str) -> None:
        self.path = path
        self.experiment_id = int(experiment_id)
        self._artifacts = artifact_location.rstrip("/")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def open(cls, tracking_uri: str, experiment_id: str) -> SqliteTraceWriter | None:
        path = sqlite_path(tracking_uri)
        if path is None or not path.exists():
            return None
        if os.environ.get("MLFLOW_SQL_TRACE_ROLLUPS_ENABLED", "").strip().lower() in ("1", "true", "yes"):
            return None  # log_spans would also queue rollup rebuilds: leave that to MLflow
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            try:
                revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                found = conn.execute(
                    "SELECT artifact_location FROM experiments WHERE experiment_id = ?", (int(experiment_id),)
                ).fetchone()
            except sqlite3.Error:
                return None
        if revision is None or revision[0] not in SCHEMA_REVISIONS or found is None:
            return None
        return cls(path, experiment_id, str(found[0] or ""))

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            self._conn = conn
        return self._conn

    def write(self, plans: Sequence[TracePlan]) -> None:
        traces, tags, metadata, spans = [], [], [], []
        experiment = self.experiment_id
        for plan in plans:
            trace_id = plan.trace_id
            root = plan.spans[0]
            traces.append(
                (
                    trace_id,
                    experiment,
                    plan.start_ns // 1_000_000,
                    max(0, plan.end_ns // 1_000_000 - plan.start_ns // 1_000_000),
                    "OK" if plan.ok else "ERROR",
                    plan.call_id,
                    plan.request_preview[:_PREVIEW],
                    plan.response_preview[:_PREVIEW],
                    root.name,
                    plan.metadata.get("mlflow.trace.session") or None,
                )
            )
            trace_tags = {
                "mlflow.artifactLocation": f"{self._artifacts}/traces/{trace_id}/artifacts",
                "mlflow.trace.spansLocation": "TRACKING_STORE",
                "mlflow.traceName": root.name,
                **plan.tags,
            }
            tags += [(key, value[:_MAX_TAG], trace_id) for key, value in trace_tags.items()]
            kept = ((key, plan.metadata.get(key, "")) for key in _METADATA_KEYS)
            metadata += [(key, value[:_MAX_TAG], trace_id) for key, value in kept if value]
            spans += _span_rows(plan, experiment)
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_TRACE_INFO, traces)
            conn.executemany(_TAG, tags)
            conn.executemany(_METADATA, metadata)
            conn.executemany(_SPAN, spans)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def span_ids(plan: TracePlan) -> list[int]:
    """The OpenTelemetry span id of each of the plan's spans (the root first): stable per call."""
    root = plan.otel_trace_id & 0xFFFF_FFFF_FFFF_FFFF or 1
    return [root if i == 0 else (root + i) & 0xFFFF_FFFF_FFFF_FFFF or 1 for i in range(len(plan.spans))]


def span_attributes(plan: TracePlan, index: int) -> dict[str, Any]:
    """The attributes of span `index` as MLflow keeps them (before its JSON encoding of each value)."""
    sp = plan.spans[index]
    attributes: dict[str, Any] = {"mlflow.traceRequestId": plan.trace_id, "mlflow.spanType": sp.span_type}
    if sp.inputs is not None:
        attributes["mlflow.spanInputs"] = sp.inputs
    if sp.outputs is not None:
        attributes["mlflow.spanOutputs"] = sp.outputs
    for key, value in (sp.attributes or {}).items():
        if value is not None:
            attributes[key] = value
    if index == 0:  # the trace's tags, user and session, as MLflow's own span processor sets them
        for key, value in plan.tags.items():
            attributes[f"mlflow.traceTag.{key}"] = value
        attributes["user.id"] = plan.metadata.get("mlflow.trace.user", "")
        attributes["session.id"] = plan.metadata.get("mlflow.trace.session", "")
    return attributes


def _attribute(value: Any) -> str:
    """One attribute as MLflow stores it: JSON-encoded, except a string that already is the JSON of a
    string, list or object, which its `sanitize_attributes` keeps as it is (so must we)."""
    if isinstance(value, str):
        if value[:1] in ('"', "[", "{"):
            try:
                if isinstance(json.loads(value), str | dict | list):
                    return value
            except ValueError:
                pass
        return _string(value)
    return compact_json(value)


def _span_rows(plan: TracePlan, experiment: int) -> list[tuple[Any, ...]]:
    """The `spans` rows of one trace. The content is the document MLflow's `Span.to_dict` gives, as
    JSON (orjson's compact form: MLflow parses it, and `LazySpan` hands it out as it is), each
    attribute's value JSON-encoded inside it as MLflow keeps attributes."""
    ids = span_ids(plan)
    trace_b64 = base64.b64encode(plan.otel_trace_id.to_bytes(16, "big")).decode()
    root_hex = f"{ids[0]:016x}"
    root_b64 = base64.b64encode(ids[0].to_bytes(8, "big")).decode()
    request_id = _string(plan.trace_id)
    rows = []
    for index, sp in enumerate(plan.spans):
        status = "OK" if sp.ok else "ERROR"
        if index == 0 or sp.attributes:
            attributes = {key: _attribute(value) for key, value in span_attributes(plan, index).items()}
        else:  # a stage's span: what `span_attributes` gives it, without the generic per-key work
            attributes = {"mlflow.traceRequestId": request_id, "mlflow.spanType": _string(sp.span_type)}
            if sp.inputs is not None:
                attributes["mlflow.spanInputs"] = _attribute(sp.inputs)
            if sp.outputs is not None:
                attributes["mlflow.spanOutputs"] = _attribute(sp.outputs)
        document: dict[str, Any] = {
            "trace_id": trace_b64,
            "span_id": base64.b64encode(ids[index].to_bytes(8, "big")).decode(),
            "parent_span_id": root_b64 if index else None,
            "name": sp.name,
            "start_time_unix_nano": int(sp.start_ns),
            "end_time_unix_nano": int(sp.end_ns),
            "events": [],
            "status": {"code": f"STATUS_CODE_{status}", "message": ""},
            "attributes": attributes,
            "links": [],
        }
        rows.append(
            (
                plan.trace_id,
                experiment,
                f"{ids[index]:016x}",
                root_hex if index else None,
                sp.name,
                sp.span_type,
                status,
                sp.start_ns,
                sp.end_ns,
                compact_json(document),
            )
        )
    return rows
