"""What the audit pages show, computed where a test can reach it without HTTP: the filter form read
from a query string, rows for the result table, a call's full record and a run's timeline."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from server.audit.search import OUTCOMES, AuditQuery

PAGE = 50
FILTERS = ("agent", "subject", "group", "tool", "decision", "stage", "policy_version", "run_id",
           "reason", "flag", "outcome", "since", "until")  # fmt: skip
DECISIONS = ("allow", "deny", "error")
STAGES = ("authenticate", "resolve", "admit", "validate", "grants", "policy", "record", "invoke", "obligations",
          "charge", "audit")  # fmt: skip


class BadFilter(ValueError):
    """A filter the form cannot apply, said so to the user."""


def _time(value: str, name: str) -> str:
    """`2026-12-01T12:00` (a datetime-local field, read as UTC) or any ISO 8601 time."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadFilter(f"{name}: expected a date and time such as 2026-12-01T12:00") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def query_from(params: Mapping[str, str]) -> tuple[AuditQuery, int]:
    """The filters a user set (empty fields filter nothing) and the page number (from 1)."""
    values: dict[str, Any] = {}
    for name in FILTERS:
        value = (params.get(name) or "").strip()
        if not value:
            continue
        if len(value) > 500:
            raise BadFilter(f"{name}: too long")
        if name in ("since", "until"):
            value = _time(value, name)
        elif name == "decision" and value not in DECISIONS:
            raise BadFilter(f"decision must be one of {', '.join(DECISIONS)}")
        elif name == "outcome" and value not in OUTCOMES:
            raise BadFilter(f"outcome must be one of {', '.join(OUTCOMES)}")
        values[name] = value
    if (params.get("shadow_diff") or "").strip() in ("1", "on", "true"):
        values["shadow_diff"] = True  # only calls the shadow policy would have decided otherwise
    try:
        page = max(1, min(int(params.get("page") or 1), 100_000))
    except ValueError:
        raise BadFilter("page must be a number") from None
    return AuditQuery(**values, limit=PAGE + 1, offset=(page - 1) * PAGE), page


def form_values(query: AuditQuery) -> dict[str, str]:
    """The form's fields as the user typed them (times back in the datetime-local shape)."""
    out = {"shadow_diff": "1" if query.shadow_diff else ""}
    for f in fields(query):
        if f.name in FILTERS:
            value = getattr(query, f.name)
            if value and f.name in ("since", "until"):
                value = datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
            out[f.name] = value or ""
    return out


def link_for(query: AuditQuery, **changes: Any) -> str:
    """The audit page's URL for `query` with `changes` (e.g. another page, or one more filter)."""
    values = {**form_values(query), **{k: v for k, v in changes.items() if k != "page"}}
    params = {k: v for k, v in values.items() if v}
    if changes.get("page", 1) != 1:
        params["page"] = changes["page"]
    return "/console/audit" + (f"?{urlencode(params)}" if params else "")


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, slots=True)
class Row:
    call_id: str
    time: str
    action: str
    agent: str
    subject: str
    tool: str
    decision: str
    stage: str
    reasons: list[str]
    outcome: str
    run_id: str


def outcome_of(row: Mapping[str, Any]) -> str:
    if row.get("interrupted"):
        return "interrupted"
    if row.get("outcome_seq") is None:
        return "unfinished" if row.get("decision") == "allow" else ""
    return "error" if row.get("is_error") else "ok"


def rows(found: list[dict[str, Any]]) -> list[Row]:
    out = []
    for r in found:
        try:
            reasons = [str(x) for x in json.loads(r.get("reasons") or "[]")]
        except ValueError:
            reasons = [str(r.get("reasons"))]
        out.append(
            Row(
                call_id=str(r["call_id"]),
                time=when(r.get("ts")),
                action=str(r.get("action") or "call"),
                agent=str(r.get("agent") or ""),
                subject=str(r.get("subject") or ""),
                tool=str(r.get("tool") or ""),
                decision=str(r.get("decision") or ""),
                stage=str(r.get("stage") or ""),
                reasons=reasons,
                outcome=outcome_of(r),
                run_id=str(r.get("run_id") or ""),
            )
        )
    return out


def stage_timings(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Milliseconds per pipeline stage, in pipeline order: the outcome's (complete) or the decision's."""
    outcome = record.get("outcome") or {}
    decision = record.get("decision") or {}
    timings = outcome.get("timings_ms") or decision.get("timings_ms") or {}
    return [(str(k), float(v)) for k, v in timings.items() if isinstance(v, int | float)]


DECISION_INPUT_KEYS = ("decision_input", "input")


def decision_input(decision: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The policy's input as recorded (redacted), or, for records from before it was kept, what the
    record holds of it (identity, tool, arguments, run, grants); the flag says which."""
    for key in DECISION_INPUT_KEYS:
        if isinstance(decision.get(key), dict):
            return dict(decision[key]), True
    return {
        "identity": {k: decision.get(k) for k in ("agent_id", "subject", "issuer", "groups")},
        "tool": {"name": decision.get("tool"), "securable": decision.get("securable"),
                 "upstream": decision.get("upstream")},
        "action": decision.get("action"),
        "arguments": decision.get("arguments"),
        "run": {"run_id": decision.get("run_id"), "depth": decision.get("run_depth")},
        "grants": {"has": decision.get("grants"), "missing": decision.get("grants_missing")},
    }, False  # fmt: skip


@dataclass(frozen=True, slots=True)
class Span:
    """One call on a run's timeline: where it starts and how long it takes, in % of the run."""

    row: Row
    x: float
    width: float
    ms: float | None


def timeline(found: list[dict[str, Any]]) -> tuple[list[Span], float]:
    """A run's calls placed on one time axis; returns them and the run's length in ms."""
    if not found:
        return [], 0.0
    start = min(float(r["ts"]) for r in found)
    end = max(float(r["ts"]) + (float(r.get("latency_ms") or 0) / 1000) for r in found)
    length = max(end - start, 0.001)
    spans = []
    for r, row in zip(found, rows(found), strict=True):
        ms = r.get("latency_ms")
        x = (float(r["ts"]) - start) / length * 100
        width = max(0.4, (float(ms or 0) / 1000) / length * 100)
        spans.append(Span(row, round(x, 3), round(min(width, 100 - x) or 0.4, 3), ms))
    return spans, length * 1000


def without_page(query: AuditQuery) -> AuditQuery:
    return replace(query, limit=PAGE + 1, offset=0)
