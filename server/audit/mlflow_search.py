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
_USER = "SELECT 1 FROM trace_request_metadata m WHERE m.request_id = ti.request_id AND m.key = 'mlflow.trace.user'"
_TAGS = ("subject", "tool", "decision", "stage", "policy_version")
USER, SESSION = "mlflow.trace.user", "mlflow.trace.session"
"""The agent and the run: MLflow's user and session of the trace (not tags: server/audit/traces.py)."""


def tag_filters(query: AuditQuery) -> dict[str, str]:
    """The query's filters that are trace tags (`castellan.<name>`), with their values."""
    pairs = {
        "subject": query.subject,
        "tool": query.tool,
        "decision": query.decision,
        "stage": query.stage,
        "policy_version": query.policy_version,
        "outcome": query.outcome,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def metadata_filters(query: AuditQuery) -> dict[str, str]:
    """The query's filters on the trace's metadata: the agent (MLflow's user) and the run (its session)."""
    pairs = {USER: query.agent, SESSION: query.run_id}
    return {k: v for k, v in pairs.items() if v is not None}


def identity(tags: dict[str, str], metadata: dict[str, str]) -> dict[str, str | None]:
    """A trace's agent and run (its user and session; a trace shipped before they were, their tags)."""
    return {
        "agent_id": metadata.get(USER) or tags.get("castellan.agent_id"),
        "run_id": metadata.get(SESSION) or tags.get("castellan.run_id"),
    }


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
        if query.agent is not None:
            clauses.append(f"EXISTS ({_USER} AND m.value = ?)")
            params.append(query.agent)
        if query.run_id is not None:
            clauses.append("ti.session_id = ?")
            params.append(query.run_id)
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
            "SELECT ti.request_id, ti.timestamp_ms, ti.status, ti.client_request_id, ti.session_id FROM trace_info ti"
            f" WHERE {' AND '.join(clauses)} ORDER BY ti.timestamp_ms DESC, ti.request_id"
        )
        # reason text is not a tag value to match: filtered here, reading further pages as needed
        for request_id, timestamp_ms, status, client_request_id, session_id in conn.execute(sql, params):
            row = _row(conn, request_id, timestamp_ms, status, client_request_id, session_id)
            if query.reason and query.reason.lower() not in " ".join(row["reasons"]).lower():
                continue
            results.append(row)
            if len(results) >= wanted:
                break
        return results[query.offset : wanted]
    finally:
        conn.close()


def _row(
    conn: sqlite3.Connection,
    request_id: str,
    timestamp_ms: int,
    status: str,
    client_request_id: str | None,
    session_id: str | None,
) -> dict[str, Any]:
    tags = dict(conn.execute("SELECT key, value FROM trace_tags WHERE request_id = ?", (request_id,)).fetchall())
    metadata = dict(
        conn.execute(
            "SELECT key, value FROM trace_request_metadata WHERE request_id = ? AND key IN (?, 'castellan.reasons')",
            (request_id, USER),
        ).fetchall()
    )
    if session_id is not None:
        metadata[SESSION] = session_id  # as MLflow reads it back
    reasons = tags.get("castellan.reasons") or metadata.get("castellan.reasons")
    who = identity(tags, metadata)
    return {
        "call_id": tags.get("castellan.call_id") or client_request_id,
        "trace_id": request_id,
        "time": datetime.fromtimestamp(timestamp_ms / 1000, UTC).astimezone().isoformat(),
        "agent_id": who["agent_id"],
        **{key: tags.get(f"castellan.{key}") for key in _TAGS},
        "run_id": who["run_id"],
        "reasons": json.loads(reasons or "[]"),
        "state": str(status),
    }
