"""Audit search for auditors: who called what, what was decided and why, what came back."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

_FILTERS = {
    "agent": "json_extract(d.record, '$.agent_id') = ?",
    "subject": "json_extract(d.record, '$.subject') = ?",
    "group": "EXISTS (SELECT 1 FROM json_each(d.record, '$.groups') WHERE value = ?)",
    "tool": "json_extract(d.record, '$.tool') = ?",
    "decision": "json_extract(d.record, '$.decision') = ?",
    "stage": "json_extract(d.record, '$.stage') = ?",
    "policy_version": "json_extract(d.record, '$.policy_version') = ?",
    "run_id": "json_extract(d.record, '$.run_id') = ?",
    "reason": "json_extract(d.record, '$.reasons') LIKE ?",
    "flag": "json_extract(o.record, '$.flags') LIKE ?",
    "since": "d.ts >= ?",
    "until": "d.ts < ?",
}
# What became of an allowed call (no argument: one condition per value).
OUTCOMES = {
    "ok": "json_extract(o.record, '$.is_error') = 0",
    "error": "json_extract(o.record, '$.is_error') = 1 AND json_extract(o.record, '$.interrupted') IS NULL",
    "interrupted": "json_extract(o.record, '$.interrupted') = 1",
    "unfinished": "o.record IS NULL AND json_extract(d.record, '$.decision') = 'allow'",
}
# Calls the shadow policy (policy.shadow_path) would have decided otherwise: a refusal's verdict is in
# its decision record, an allowed call's in its outcome record (decided beside the call).
SHADOW_DIFF = "(json_extract(d.record, '$.shadow.differs') = 1 OR json_extract(o.record, '$.shadow.differs') = 1)"


@dataclass(frozen=True, slots=True)
class AuditQuery:
    agent: str | None = None
    subject: str | None = None
    group: str | None = None
    """A group the caller's token named."""
    tool: str | None = None
    decision: str | None = None
    stage: str | None = None
    """The stage that refused the call (admit, grants, policy, ...)."""
    reason: str | None = None
    """Text anywhere in the reasons."""
    policy_version: str | None = None
    run_id: str | None = None
    flag: str | None = None
    """A flag on the outcome, e.g. `prompt_injection`."""
    outcome: str | None = None
    """ok, error, interrupted (cut off by a crash, closed at the next start) or unfinished (no outcome yet)."""
    since: str | None = None
    """ISO 8601 time, inclusive."""
    until: str | None = None
    limit: int = 100
    offset: int = 0
    shadow_diff: bool = False
    """Only calls the shadow policy would have decided otherwise (docs/shadow-and-replay.md)."""


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def search(conn: sqlite3.Connection, query: AuditQuery) -> list[dict[str, Any]]:
    """Calls matching every filter given, newest first: the decision record with its outcome."""
    where, args = ["d.kind = 'decision'"], []
    for f in fields(query):
        value = getattr(query, f.name)
        if f.name in _FILTERS and value is not None:
            where.append(_FILTERS[f.name])
            args.append(
                f"%{value}%"
                if f.name in ("reason", "flag")
                else _epoch(value)
                if f.name in ("since", "until")
                else value
            )
    if query.outcome is not None:
        if query.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
        where.append(OUTCOMES[query.outcome])
    if query.shadow_diff:
        where.append(SHADOW_DIFF)
    sql = (
        "SELECT d.seq, d.call_id, d.record, o.record FROM outbox d LEFT JOIN outbox o ON o.call_id = d.call_id "
        f"AND o.kind = 'outcome' WHERE {' AND '.join(where)} ORDER BY d.seq DESC LIMIT ? OFFSET ?"
    )
    rows = conn.execute(sql, [*args, max(1, min(query.limit, 10_000)), min(max(0, query.offset), 2**62)]).fetchall()
    return [
        {**json.loads(decision), "seq": seq, "call_id": call_id, "outcome": json.loads(outcome) if outcome else None}
        for seq, call_id, decision, outcome in rows
    ]


def show(conn: sqlite3.Connection, call_id: str) -> dict[str, Any] | None:
    rows = conn.execute(
        "SELECT kind, seq, record, hash FROM outbox WHERE call_id = ? ORDER BY seq", (call_id,)
    ).fetchall()
    if not rows:
        return None
    return {kind: {"seq": seq, "hash": digest, **json.loads(record)} for kind, seq, record, digest in rows}


_COLUMNS = ("time", "agent_id", "tool", "decision", "stage", "reasons", "run_id", "policy_version", "call_id")
# A CSV is for reading the calls elsewhere: it carries who acted for whom, with what (redacted) and from where.
# (after the table's columns, in their order, so existing readers of the CSV keep working)
_CSV_COLUMNS = (*_COLUMNS, "subject", "groups", "arguments", "grants", "grants_missing", "client")
_JSON_COLUMNS = frozenset({"arguments", "client"})
_LIST_COLUMNS = frozenset({"reasons", "groups", "grants", "grants_missing"})


def _cell(record: dict[str, Any], column: str) -> str:
    value = record.get(column)
    if column in _LIST_COLUMNS:
        return "; ".join(str(v) for v in value or [])
    if column in _JSON_COLUMNS:
        return json.dumps(value or {}, separators=(",", ":"), sort_keys=True)
    return str(value) if value is not None else ""


def render(results: Iterable[dict[str, Any]], fmt: str) -> str:
    """`table`, `jsonl` or `csv`."""
    items = list(results)
    if fmt == "jsonl":
        return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in items)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({c: _cell(r, c) for c in _CSV_COLUMNS} for r in items)
        return out.getvalue()
    flat = [{c: _cell(r, c) for c in _COLUMNS} for r in items]
    widths = {c: min(48, max([len(c), *(len(str(r[c])) for r in flat)])) for c in _COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in _COLUMNS)]
    lines += ["  ".join(str(r[c])[: widths[c]].ljust(widths[c]) for c in _COLUMNS) for r in flat]
    return "\n".join(lines) + "\n"


def write_parquet(results: Iterable[dict[str, Any]], path: Path) -> None:
    """One row per call: the table columns plus arguments, obligations and outcome as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for r in results:
        outcome = r.get("outcome") or {}
        rows.append(
            {
                "time": r.get("time"),
                "call_id": r.get("call_id"),
                "agent_id": r.get("agent_id"),
                "subject": r.get("subject"),
                "tool": r.get("tool"),
                "decision": r.get("decision"),
                "stage": r.get("stage"),
                "code": r.get("code"),
                "reasons": list(r.get("reasons") or []),
                "policy_version": r.get("policy_version"),
                "run_id": r.get("run_id"),
                "arguments": json.dumps(r.get("arguments")) if "arguments" in r else None,
                "is_error": outcome.get("is_error"),
                "tokens_in": outcome.get("tokens_in"),
                "tokens_out": outcome.get("tokens_out"),
                "latency_ms": outcome.get("latency_ms"),
            }
        )
    schema = pa.schema(
        [
            ("time", pa.string()),
            ("call_id", pa.string()),
            ("agent_id", pa.string()),
            ("subject", pa.string()),
            ("tool", pa.string()),
            ("decision", pa.string()),
            ("stage", pa.string()),
            ("code", pa.string()),
            ("reasons", pa.list_(pa.string())),
            ("policy_version", pa.string()),
            ("run_id", pa.string()),
            ("arguments", pa.string()),
            ("is_error", pa.bool_()),
            ("tokens_in", pa.int64()),
            ("tokens_out", pa.int64()),
            ("latency_ms", pa.float64()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
