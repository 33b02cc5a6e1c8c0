"""One call's audit records as an MLflow trace: a root span for the call and a child span per
pipeline stage, with what auditors filter on as tags (`TracePlan.tags`) and the rest in the spans.

The trace id is derived from the call id (the outbox id), so shipping a call twice writes the same
trace: MLflow upserts spans and merges trace info, and the call id is also the trace's
`client_request_id`, which is what auditors and the zero-loss test match on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from server.audit.outbox import PendingCall

PREVIEW_CHARS = 1_000
# The pipeline stage names, as spans; `invoke` is the tool itself.
_SPAN_NAMES = {"invoke": "tool"}
_SPAN_TYPES = {"invoke": "TOOL", "policy": "GUARDRAIL", "grants": "GUARDRAIL", "authenticate": "GUARDRAIL",
               "approval": "GUARDRAIL"}  # fmt: skip
TAGS = ("subject", "tool", "decision", "stage", "policy_version")
"""The decision's fields that are trace tags (`castellan.<name>`): what `castellan audit search` filters
on. A tag costs a tracking server an ORM merge per trace (bench/results/shipping.md), so the agent and
the run are MLflow's own user and session (`mlflow.trace.user`, `mlflow.trace.session`: filterable,
and written anyway), and what nobody filters on (the action, the denial code) is an attribute of the
root span."""
_ROOT_ATTRIBUTES = ("action", "code")
_TAG_KEYS = tuple((key, f"castellan.{key}") for key in TAGS)
_STANDARD_JSON = json.JSONEncoder(separators=(",", ":"), default=str).encode
"""The standard encoder, for what orjson refuses (`compact_json`)."""
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
"""Dates and dataclasses go to `default=str`, as with the standard encoder."""


class SpanPlan(NamedTuple):
    """One span (immutable: a named tuple, built 14 times a call, in a tenth of a frozen dataclass's
    time: 0.5 against 4.5 us, whose `__init__` sets each field through `object.__setattr__`)."""

    name: str
    span_type: str
    start_ns: int
    end_ns: int
    ok: bool
    inputs: Any = None
    outputs: Any = None
    attributes: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TracePlan:
    """Everything MLflow needs for one call, without importing MLflow (which is slow to import)."""

    call_id: str
    otel_trace_id: int
    start_ns: int
    end_ns: int
    ok: bool
    tags: dict[str, str]
    """The trace's tags, every one a non-empty string (written as they are by each route)."""
    metadata: dict[str, str]
    request_preview: str
    response_preview: str
    spans: tuple[SpanPlan, ...]
    trace_id: str = field(init=False, compare=False)
    """MLflow's id of the trace (`tr-` and the hex of `otel_trace_id`), formatted once: the row
    builders read it for every span."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "trace_id", f"tr-{self.otel_trace_id:032x}")


def new_call_id() -> str:
    """A call id that sorts by time: a UUID version 7 as 32 hex digits (milliseconds since the epoch
    in the first 12, then the version digit and 74 random bits). Its trace id sorts by time too
    (`otel_trace_id`), so every MLflow index keyed by trace id takes new rows at its end."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return f"{value:032x}"


def trace_id_for(call_id: str) -> str:
    return f"tr-{otel_trace_id(call_id):032x}"


def otel_trace_id(call_id: str) -> int:
    """The call's trace id: the SHA-256 of its call id, except that a time-ordered call id (UUID
    version 7, `new_call_id`) keeps its 48-bit time at the front. The MLflow store indexes eight
    B-trees by trace id (trace_info, each tag key, metadata, spans twice); random ids put every new
    trace on its own leaf page of each, a time-ordered one on the last (measured: 1.07 -> 0.66 ms of
    the shipper's write thread per call into a store of 20,000 traces, bench/results/shipping.md).
    Any other call id (uuid4, as before) maps to the same id as it always did, so a re-ship of an
    older call still upserts its trace."""
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:16], "big")
    if len(call_id) == 32 and call_id[12] == "7" and _is_hex(call_id):
        return int(call_id[:12], 16) << 80 | digest & (1 << 80) - 1 or 1
    return digest or 1


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _epoch_ns(record: dict[str, Any], fallback: float) -> int:
    try:
        return int(datetime.fromisoformat(str(record["time"])).timestamp() * 1e9)
    except (KeyError, ValueError):
        return int(fallback * 1e9)


def compact_json(value: Any) -> str:
    """Compact JSON by orjson (non-ASCII as it is; ~0.5 us where `json.dumps` took 5-11 for a small
    object), what a trace holds (previews, metadata, span content and attributes); what orjson refuses
    (a key that is not a string, an integer beyond 64 bits, a lone surrogate) by the standard encoder,
    compact too, escaped to ASCII (which any of them can be stored as)."""
    try:
        return orjson.dumps(value, default=str, option=_PASSTHROUGH).decode()
    except TypeError:
        return _STANDARD_JSON(value)


def _preview(value: Any) -> str:
    return (value if isinstance(value, str) else compact_json(value))[:PREVIEW_CHARS]


def plan_trace(pending: PendingCall) -> TracePlan:
    decision = pending.decision or {}
    outcome = pending.outcome
    get = decision.get
    start_ns = _epoch_ns(decision, pending.decided_at)
    timings: dict[str, float] = (outcome.get("timings_ms") if outcome else None) or get("timings_ms") or {}
    is_error = bool(outcome.get("is_error")) if outcome else False
    if outcome and outcome.get("latency_ms") is not None:
        end_ns = start_ns + int(float(outcome["latency_ms"]) * 1e6)
    else:
        end_ns = start_ns + int(sum(timings.values()) * 1e6)
    verdict = get("decision")
    ok = verdict == "allow" and not is_error
    stopped_at = get("stage")
    # The stages whose span carries something (the rest have no inputs and no outputs).
    special = {"policy", "grants", "approval", "invoke"}
    if stopped_at is not None:
        special.add(stopped_at)

    spans: list[SpanPlan] = []
    cursor = start_ns
    for stage, ms in timings.items():
        duration = max(int(float(ms) * 1e6), 1_000)
        if stage in special:
            failed = stage == stopped_at or (stage == "invoke" and is_error)
            inputs = get("arguments") if stage == "invoke" else None
            outputs = _stage_outputs(stage, decision, outcome)
        else:
            failed, inputs, outputs = False, None, None
        spans.append(
            SpanPlan(
                _SPAN_NAMES.get(stage, stage),
                _SPAN_TYPES.get(stage, "UNKNOWN"),
                cursor,
                cursor + duration,
                not failed,
                inputs,
                outputs,
            )
        )
        cursor += duration
    end_ns = max(end_ns, cursor)
    if outcome and outcome.get("relayed"):
        spans += _relayed_spans(outcome, start_ns)

    call_id = pending.call_id
    tags = {"castellan.call_id": call_id}
    for key, tag in _TAG_KEYS:
        value = get(key)
        if value is not None:
            tags[tag] = str(value)
    reasons = get("reasons")
    reasons_json = json.dumps(reasons) if reasons else "[]"
    if reasons_json != "[]":  # searched results show them; none is the common case, and no tag
        tags["castellan.reasons"] = reasons_json
    traceparent = get("traceparent")
    if traceparent:
        tags["castellan.traceparent"] = str(traceparent)
    if outcome and outcome.get("flags"):
        tags["castellan.flags"] = ",".join(outcome["flags"])
    # What became of the call: ok, error, interrupted (its gateway died mid-call), or denied.
    tags["castellan.outcome"] = (
        verdict or "unknown"
        if verdict != "allow"
        else "interrupted"
        if outcome and outcome.get("interrupted")
        else "error"
        if is_error
        else "ok"
    )
    tags = {key: value for key, value in tags.items() if value}
    client = get("client")
    metadata = {
        "castellan.call_id": call_id,
        "castellan.reasons": reasons_json,
        "castellan.request_id": str(get("request_id") or ""),
        "castellan.client": compact_json(client) if client else "{}",
        "castellan.traceparent": str(traceparent or ""),
        "castellan.seqs": ",".join(map(str, pending.seqs)),
        "castellan.complete": "true" if outcome is not None or verdict != "allow" else "false",
        "mlflow.trace.user": str(get("agent_id") or ""),
        "mlflow.trace.session": str(get("run_id") or ""),
    }
    if outcome is not None:
        metadata["castellan.tokens_in"] = str(outcome.get("tokens_in", 0))
        metadata["castellan.tokens_out"] = str(outcome.get("tokens_out", 0))
    tool, arguments = get("tool"), get("arguments")
    attributes = {"castellan.traceparent": traceparent, "castellan.call_id": call_id}
    for key in _ROOT_ATTRIBUTES:
        value = get(key)
        if value is not None:
            attributes[f"castellan.{key}"] = value
    root = SpanPlan(
        f"{get('action', 'call')} {tool or '?'}",
        "AGENT",
        start_ns,
        end_ns,
        ok,
        {"tool": tool, "arguments": arguments},
        _root_outputs(decision, outcome),
        attributes,
    )
    if outcome and outcome.get("result_preview"):
        response = outcome["result_preview"]
    else:
        response = f"{verdict}: {'; '.join(reasons or [])}" if verdict != "allow" else ""
    return TracePlan(
        call_id=call_id,
        otel_trace_id=otel_trace_id(call_id),
        start_ns=start_ns,
        end_ns=end_ns,
        ok=ok,
        tags=tags,
        metadata=metadata,
        request_preview=_preview({"tool": tool, "arguments": arguments}),
        response_preview=_preview(response),
        spans=(root, *spans),
    )


def _relayed_spans(outcome: dict[str, Any] | None, fallback_ns: int) -> list[SpanPlan]:
    """What the upstream asked of the agent during the call (`relayed` in the outcome), one span each."""
    spans = []
    for relayed in (outcome or {}).get("relayed") or []:
        if not isinstance(relayed, dict):
            continue
        started = relayed.get("started_at")
        start = int(float(started) * 1e9) if isinstance(started, int | float) else fallback_ns
        spans.append(
            SpanPlan(
                name=f"relay {relayed.get('action', '?')}",
                span_type="LLM" if relayed.get("action") == "sample" else "TOOL",
                start_ns=start,
                end_ns=start + max(int(float(relayed.get("ms") or 0) * 1e6), 1_000),
                ok=relayed.get("decision") == "allow" and relayed.get("outcome") == "answered",
                inputs={"method": relayed.get("method"), "upstream": relayed.get("upstream")},
                outputs={
                    k: relayed.get(k) for k in ("decision", "stage", "reasons", "outcome", "tokens") if k in relayed
                },
            )
        )
    return spans


def _stage_outputs(stage: str, decision: dict[str, Any], outcome: dict[str, Any] | None) -> Any:
    if stage == "policy":
        return {
            "decision": decision.get("decision"),
            "reasons": decision.get("reasons"),
            "policy_version": decision.get("policy_version"),
            "obligations": decision.get("obligations"),
        }
    if stage == "grants":
        return {"has": decision.get("grants"), "missing": decision.get("grants_missing", [])}
    if stage == "approval" and decision.get("approval") is not None:  # who approved or refused, and what they saw
        body = dict(decision["approval"])
        if stage == decision.get("stage"):  # refused there: denied by the approver, or timed out
            body.update(decision=decision.get("decision"), code=decision.get("code"), reasons=decision.get("reasons"))
        return body
    if stage == "invoke" and outcome is not None:
        return {"result_preview": outcome.get("result_preview"), "is_error": outcome.get("is_error")}
    if stage == decision.get("stage"):
        return {"decision": decision.get("decision"), "code": decision.get("code"), "reasons": decision.get("reasons")}
    return None


def _root_outputs(decision: dict[str, Any], outcome: dict[str, Any] | None) -> Any:
    body: dict[str, Any] = {"decision": decision.get("decision"), "reasons": decision.get("reasons")}
    if outcome is not None:
        body.update(
            result_preview=outcome.get("result_preview"),
            is_error=outcome.get("is_error"),
            tokens_in=outcome.get("tokens_in"),
            tokens_out=outcome.get("tokens_out"),
            latency_ms=outcome.get("latency_ms"),
        )
    return body


def as_one_span(plan: TracePlan) -> TracePlan:
    """The same trace as its root span alone (`audit.mlflow_spans = "call"`): each stage's duration,
    state and findings, and what was relayed during the call, become attributes of the root
    (`castellan.stages`, `castellan.relayed`). A tracking server ingests it at a fraction of the
    cost of one span per stage (bench/results/shipping.md); tags, metadata and previews are unchanged."""
    root, children = plan.spans[0], plan.spans[1:]
    if not children:
        return plan
    stages: dict[str, Any] = {}
    relayed: list[dict[str, Any]] = []
    for sp in children:
        entry: dict[str, Any] = {"ms": round((sp.end_ns - sp.start_ns) / 1e6, 3)}
        if not sp.ok:
            entry["ok"] = False
        if sp.outputs is not None:
            entry["outputs"] = sp.outputs
        if sp.name.startswith("relay "):
            relayed.append({"name": sp.name, "inputs": sp.inputs, **entry})
        else:
            stages[sp.name] = entry
    attributes = {**(root.attributes or {}), "castellan.stages": stages}
    if relayed:
        attributes["castellan.relayed"] = relayed
    return replace(plan, spans=(root._replace(attributes=attributes),))
