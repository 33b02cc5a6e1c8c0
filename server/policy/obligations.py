"""Pipeline stage 6, obligations: what policy asked to be done to the result (redact, cap size).
`require_approval` is carried out before the tool runs, by the approval stage (server/approvals)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from server import content
from server.call import Call
from server.policy.engine import Decision
from server.registry import ToolOutput

REDACTED = "[REDACTED]"


def redact(value: Any, fields: frozenset[str]) -> Any:
    """`value` with every object member named in `fields` replaced, at any depth."""
    if isinstance(value, Mapping):
        return {k: REDACTED if k in fields else redact(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, fields) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class ApprovalObligation:
    """`require_approval`: the call waits for a human in one of `groups`, who is shown `reason`."""

    groups: tuple[str, ...]
    reason: str = ""
    timeout_seconds: float | None = None
    """The policy's own, shorter wait (the gateway's `approvals.timeout_seconds` caps it)."""


def approval_obligation(decision: Decision | None) -> ApprovalObligation | None:
    """The decision's `require_approval`, as the normaliser (`_result`) checked it, or None."""
    value = decision.obligations.get("require_approval") if decision is not None else None
    if not isinstance(value, Mapping):
        return None
    timeout = value.get("timeout_seconds")
    return ApprovalObligation(
        groups=tuple(dict.fromkeys(str(g) for g in value.get("groups", ()))),
        reason=str(value.get("reason", "")),
        timeout_seconds=float(timeout) if isinstance(timeout, int | float) else None,
    )


class ObligationsStage:
    """Applies the decision's obligations to the tool output. Known obligations only (the decision
    normaliser denies any other), so nothing a policy asks for is silently skipped."""

    name = "obligations"

    async def run(self, call: Call) -> Call:
        output = original = call.output
        obligations = call.decision.obligations if call.decision else {}
        if output is None or original is None or not obligations:
            return call
        fields = frozenset(obligations.get("redact_fields", ()))
        if fields and output.structured is not None:
            structured = redact(output.structured, fields)
            output = ToolOutput(
                text=json.dumps(structured, default=str), structured=structured, is_error=output.is_error
            )
        elif fields:
            output = replace(output, text=_redact_text(output.text, fields), content=())
        limit = obligations.get("max_result_chars")
        if limit is not None:
            output = _capped(output, int(limit), call.tool is not None and call.tool.spec.output_schema is not None)
        if output is not original and output.returned is None:  # what the tool returned, for the audit
            output = replace(output, returned=content.summary(content.parts(original)))
        return call.evolve(output=output)


def _capped(output: ToolOutput, cut: int, has_output_schema: bool) -> ToolOutput:
    """`output` if all of its content (`server.content`: text, structured content, binary payloads as
    their base64, blocks' other members) fits in `cut` characters; else its text, cut there, with
    binary parts as notes of what they were. A truncated result cannot be valid structured content
    or carry its blocks any more: the text only, saying so."""
    found = content.parts(output)
    size = content.total_chars(found)
    if size <= cut:
        return output
    text = content.as_text(found)
    dropped = [p.kind for p in found if p.binary]
    why = f" (the result had {size:,}; {', '.join(dropped)} content dropped)" if dropped else ""
    cut_text = text[:cut] + f"\n[truncated by policy at {cut} characters{why}]"
    return content.rewritten(output, cut_text, has_output_schema=has_output_schema)


def _redact_text(text: str, fields: frozenset[str]) -> str:
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return json.dumps(redact(parsed, fields), default=str)
