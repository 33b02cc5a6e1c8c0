"""`castellan audit search --source mlflow` on a local MLflow store (SQLite), answered from its tables.

MLflow's client costs seconds before the first query (importing `mlflow` and opening its SQLAlchemy
store); an auditor filtering on an agent and a decision wants the answer in about a second. The rows
are the ones `server/audit/mlflow_sql.py` writes (and `log_spans` writes): `trace_info` and
`trace_tags`, read here for the store schema revision that module is written for, and the same
answer as `MlflowTarget.search` (a differential test checks it). Any other store, or another schema
revision, goes through MLflow's client.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.audit.search import AuditQuery

SCHEMA_REVISIONS = frozenset({"dc11669786a5"})
"""MLflow store schema revisions (alembic) this reader knows: MLflow 3.17.x, as `mlflow_sql`."""

_TAGGED = "SELECT 1 FROM trace_tags t WHERE t.request_id = ti.request_id AND t.key = ?"
_TAGS = ("agent_id", "subject", "tool", "decision", "stage", "policy_version", "run_id")


def tag_filters(query: AuditQuery) -> dict[str, str]:
    """The query's filters that are trace tags (`castellan.<name>`), with their values."""
    pairs = {
        "agent_id": query.agent,
        "subject": query.subject,
        "tool": query.tool,
        "decision": query.decision,
        "stage": query.stage,
        "policy_version": query.policy_version,
        "run_id": query.run_id,
        "outcome": query.outcome,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _millis(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def search_store(path: Path, experiment: str, query: AuditQuery) -> list[dict[str, Any]] | None:
    """Calls matching `query` in the store at `path`, newest first; None when this reader does not know
    the store's schema (the caller then asks MLflow's client). Raises ValueError for a filter MLflow
    cannot answer, as `MlflowTarget.search` does."""
    if query.outcome == "unfinished":
        raise ValueError("unfinished calls are not shipped until they end: search the outbox")
    if query.group is not None:
        raise ValueError("a group filter searches the outbox (MLflow's traces are not tagged with groups)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        try:
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.DatabaseError:
            return None
        if revision is None or revision[0] not in SCHEMA_REVISIONS:
            return None
        found = conn.execute(
            "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'", (experiment,)
        ).fetchone()
        if found is None:
            return []
        clauses, params = ["ti.experiment_id = ?"], [found[0]]
        tags = {f"castellan.{key}": value for key, value in tag_filters(query).items()}
        for key, value in tags.items():
            if value is not None:
                clauses.append(f"EXISTS ({_TAGGED} AND t.value = ?)")
                params += [key, value]
        if query.flag:
            clauses.append(f"EXISTS ({_TAGGED} AND t.value LIKE ?)")
            params += ["castellan.flags", f"%{query.flag}%"]
        if query.since:
            clauses.append("ti.timestamp_ms >= ?")
            params.append(_millis(query.since))
        if query.until:
            clauses.append("ti.timestamp_ms < ?")
            params.append(_millis(query.until))
        wanted = query.offset + query.limit
        results: list[dict[str, Any]] = []
        sql = (  # ordered as MLflow orders traces, ties included
            "SELECT ti.request_id, ti.timestamp_ms, ti.status, ti.client_request_id FROM trace_info ti"
            f" WHERE {' AND '.join(clauses)} ORDER BY ti.timestamp_ms DESC, ti.request_id"
        )
        # reason text is not a tag value to match: filtered here, reading further pages as needed
        for request_id, timestamp_ms, status, client_request_id in conn.execute(sql, params):
            row = _row(conn, request_id, timestamp_ms, status, client_request_id)
            if query.reason and query.reason.lower() not in " ".join(row["reasons"]).lower():
                continue
            results.append(row)
            if len(results) >= wanted:
                break
        return results[query.offset : wanted]
    finally:
        conn.close()


def _row(
    conn: sqlite3.Connection, request_id: str, timestamp_ms: int, status: str, client_request_id: str | None
) -> dict[str, Any]:
    tags = dict(conn.execute("SELECT key, value FROM trace_tags WHERE request_id = ?", (request_id,)).fetchall())
    reasons = tags.get("castellan.reasons")
    if not reasons:
        meta = conn.execute(
            "SELECT value FROM trace_request_metadata WHERE request_id = ? AND key = 'castellan.reasons'",
            (request_id,),
        ).fetchone()
        reasons = meta[0] if meta else None
    return {
        "call_id": tags.get("castellan.call_id") or client_request_id,
        "trace_id": request_id,
        "time": datetime.fromtimestamp(timestamp_ms / 1000, UTC).astimezone().isoformat(),
        **{key: tags.get(f"castellan.{key}") for key in _TAGS},
        "reasons": json.loads(reasons or "[]"),
        "state": str(status),
    }
