"""What an audit record says about a call: one builder for the decision, one for the outcome."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from server import content
from server.audit.encoding import decode
from server.audit.injection import scan_output
from server.audit.redaction import Redactor
from server.call import Call
from server.policy._input import build_input, recorded_input

RESULT_PREVIEW_CHARS = 2_000
_PREVIEW_JSON = json.JSONEncoder(default=str).encode  # = json.dumps(value, default=str), made once


def _redactor_for(call: Call, redactor: Redactor) -> Redactor:
    """The configured redaction plus the fields the decision's `redact_fields` obligation names."""
    fields = call.decision.obligations.get("redact_fields") if call.decision else None
    return redactor.with_fields(fields) if isinstance(fields, list) else redactor


def decision_record(call: Call, redactor: Redactor | None = None) -> dict[str, Any]:
    """Who called what, with which arguments, and what was decided: written before the tool runs.
    Stored redacted: arguments also of the fields the decision named, and every member (reasons,
    the tool name a caller chose) of the secrets the redactor finds."""
    identity, decision, error = call.identity, call.decision, call.error
    base = redactor or Redactor()
    redact = _redactor_for(call, base)
    verdict = "allow" if error is None else error.verdict
    record = {
        "call_id": call.call_id,
        "request_id": call.request_id,
        "client": call.client.as_record(),
        "time": datetime.fromtimestamp(call.started_at, UTC).isoformat(),
        "action": call.action,
        "agent_id": identity.agent_id if identity else None,
        "subject": identity.subject if identity else None,
        "issuer": identity.issuer if identity else None,
        "groups": list(identity.groups) if identity else [],
        "tool": call.tool_name,
        "securable": call.tool.spec.securable if call.tool else None,
        "upstream": call.tool.spec.upstream if call.tool else None,
        "arguments": {},  # redacted below, once, with the decision's fields too
        "run_id": call.run.run_id,
        "run_depth": call.run.depth,
        "traceparent": call.run.traceparent,
        "decision": verdict,
        "stage": error.stage if error else None,
        "code": error.code if error else None,
        "reasons": list(error.reasons) if error else list(decision.reasons if decision else ()),
        "policy_version": decision.policy_version if decision else None,
        "policy_engine": decision.engine if decision else None,
        "obligations": dict(decision.obligations) if decision else {},
        "grants": list(call.grants.has) if call.grants else [],
        "grants_missing": list(call.grants.missing) if call.grants else [],
        "timings_ms": {stage: round(seconds * 1000, 4) for stage, seconds in call.timings},
        # Guardrails and shadow policy (docs/guardrails.md, docs/shadow-and-replay.md).
        "detections": [dict(d) for d in call.detections],
        "flags": list(decision.obligations.get("flags", ())) if decision else [],
    }
    # A human approval the call waited for (server/approvals): who decided, when, what they were shown.
    approval = call.approval if call.approval is not None else getattr(error, "approval", None)
    if approval is not None:
        record["approval"] = dict(approval)
    if decision is not None and decision.shadow is not None:
        record["shadow"] = dict(decision.shadow)
    redacted: dict[str, Any] = base.apply(record)
    # `redact` is `base` plus the decision's fields: one pass of it over what the caller sent (another
    # over its output would redact the markers again, `[[REDACTED]]`)
    redacted["arguments"] = redact.apply(dict(call.arguments))
    replayable = _replay_input(call)
    if replayable is not None:
        # One redaction of this document for the record and the decision log's line of the decision
        # (`DecisionLog.event`, with this redactor, when no mask changed it): whichever writes it first
        # redacts it and keeps it, the other takes it (`kept` checks it is the same document). The line
        # is written after this record is (the policy stage queues it), so here is usually first.
        kept = redact.kept(call.decision, replayable)
        if kept is None:
            kept = redact.apply(replayable)
            if redact is base:  # the log redacts with the base redactor, never with a decision's fields
                base.keep(call.decision, replayable, kept)
        redacted["decision_input"] = kept
    return redacted


def _replay_input(call: Call) -> dict[str, Any] | None:
    """The decision input policy saw, as `castellan policy replay` needs it (without the arguments
    and the views computed from them: the record has the arguments), when policy decided the call."""
    error = call.error
    if call.decision is None or call.identity is None or call.tool is None:
        return None
    if error is not None and error.stage != "policy" and not call.decision.allow:
        return None
    if getattr(call.tool, "decision_input", None) is None:
        # What the record keeps does not depend on the arguments then (only the parts it leaves out,
        # `RECOMPUTED`, do): built without them, it skips normalising what it would throw away.
        return recorded_input(build_input(call.evolve(arguments={})))
    return recorded_input(build_input(call))


def outcome_record(call: Call, finished_at: float, redactor: Redactor | None = None) -> dict[str, Any]:
    """What came back: written after the tool ran and obligations applied; the preview stored redacted."""
    output = call.output
    base = redactor or Redactor()
    redact = _redactor_for(call, base)
    found = content.parts(output) if output else ()  # every kind of content, not only the text
    preview = "\n".join(_redacted_text(p.describe(), redact) for p in found)[: RESULT_PREVIEW_CHARS * 2]
    record: dict[str, Any] = {
        "call_id": call.call_id,
        "is_error": output.is_error if output else call.error is not None,
        "error": "; ".join(call.error.reasons) if call.error else None,
        "result_preview": None,  # redacted below, once
        "result_chars": content.total_chars(found),
        "content": content.summary(found) if output else None,
        "content_returned": output.returned if output else None,  # before an obligation or truncation
        "tokens_in": call.tokens_in,
        "tokens_out": call.tokens_out,
        "latency_ms": round((finished_at - call.started_at) * 1000, 3),
        "timings_ms": {stage: round(seconds * 1000, 4) for stage, seconds in call.timings},
        # Passed to the agent unchanged; flagged here for auditors.
        "flags": ["prompt_injection"] if (markers := scan_output(output) if output else []) else [],
        "injection_markers": markers,
        "detections": [dict(d) for d in call.result_detections],
    }
    if call.shadow is not None:  # what the shadow policy said about this allowed call
        record["shadow"] = dict(call.shadow)
    if call.result_decision is not None:  # the after-call decision on what the result held (guardrails)
        guard = call.result_decision
        record["guard"] = {"allow": guard.allow, "reasons": list(guard.reasons),
                           "obligations": dict(guard.obligations), "policy_version": guard.policy_version}  # fmt: skip
        record["flags"] = [*record["flags"], *guard.obligations.get("flags", ())]
    if call.relay is not None and call.relay.spans:  # what the upstream relayed to the agent: child spans
        record["relayed"] = list(call.relay.spans)
    if call.relay is not None and call.relay.cancelled:
        record["cancelled"] = True
    redacted: dict[str, Any] = base.apply(record)
    if output:
        redacted["result_preview"] = redact.apply(preview)[:RESULT_PREVIEW_CHARS]
    return redacted


def _redacted_text(text: str, redact: Redactor) -> str:
    """A JSON result has its named fields redacted too (the text is stored, not the structure), written
    back as `json.dumps` writes it (the form auditors have always read in the preview)."""
    if text[:1] in ("{", "[") and len(text) <= 65_536:
        try:
            return _PREVIEW_JSON(redact.apply(decode(text)))
        except ValueError:
            pass
    return text
