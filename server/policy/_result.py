"""Turns a raw policy result into a `Decision`: the same normalisation whichever engine decided."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.guardrails.kinds import KINDS
from server.policy.engine import Decision, LogMask

# The obligations the gateway knows how to carry out; anything else denies the call, since a
# policy author who asks for an obligation we would silently skip must not get an allow.
KNOWN_OBLIGATIONS = {"redact_fields", "max_result_chars", "require_approval"}
# Content guardrails (server/guardrails): mask these kinds of detections; record these flags.
KNOWN_OBLIGATIONS |= {"redact_detections", "flags"}

# The reason for any evaluation error, identical for both engines (their messages differ; the
# detail goes to the gateway log). Both engines treat a builtin error as an error, never as undefined.
EVALUATION_FAILED = "policy evaluation failed"
_REASONS = (list, tuple, set, frozenset)


def to_decision(
    raw: Any,
    *,
    policy_version: str,
    engine: str,
    decision_id: str = "",
    eval_ms: float = 0.0,
    log_mask: LogMask | None = None,
) -> Decision:
    """Normalise `raw` (the entrypoint's value, `None` when undefined). Malformed means deny.
    `log_mask` rides on the decision as it is (the decision log checks it against the event)."""
    problem: str | None = None
    if raw is None:
        problem = "policy returned no decision (undefined)"
    elif not isinstance(raw, Mapping):
        problem = "policy decision is not an object"
    elif not isinstance(allow := raw.get("allow"), bool):
        problem = "policy decision has no boolean 'allow'"
    else:
        reasons = raw.get("reasons", [])
        obligations = raw.get("obligations", {})
        # the commonest decision, an allow with no reasons and no obligations, needs none of the checks
        if not (type(reasons) is list and not reasons):
            if not isinstance(reasons, _REASONS) or not all(isinstance(r, str) for r in reasons):
                problem = "policy decision 'reasons' is not a set of strings"
            else:
                reasons = sorted(set(reasons))
        if problem is None and not (type(obligations) is dict and not obligations):
            if not isinstance(obligations, Mapping):
                problem = "policy decision 'obligations' is not an object"
            else:
                problem = _obligation_problem(obligations)
    if problem:
        return Decision(
            allow=False,
            reasons=(problem,),
            policy_version=policy_version,
            engine=engine,
            decision_id=decision_id,
            eval_ms=eval_ms,
            log_mask=log_mask,
        )
    return Decision(
        allow=allow is True,  # a bool by now
        reasons=tuple(reasons),
        obligations=dict(obligations),
        policy_version=policy_version,
        engine=engine,
        decision_id=decision_id,
        eval_ms=eval_ms,
        log_mask=log_mask,
    )


def _obligation_problem(obligations: Mapping[str, Any]) -> str | None:
    for key, value in obligations.items():
        if key not in KNOWN_OBLIGATIONS:
            return f"policy asked for obligation {key!r}, which this gateway cannot carry out"
        if key == "redact_fields" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return "obligation redact_fields must be a list of field names"
        if key == "max_result_chars" and not (
            isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        ):
            return "obligation max_result_chars must be a positive number"
        if key in ("redact_detections", "flags") and not (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        ):
            return f"obligation {key} must be a list of strings"
        if key == "redact_detections" and (unknown := sorted(set(value) - set(KINDS))):
            return f"obligation redact_detections names kinds this gateway does not detect: {', '.join(unknown)}"
        if key == "require_approval":
            problem = _approval_problem(value)
            if problem:
                return f"obligation require_approval {problem}"
    return None


# What `require_approval` may hold (server/approvals): who may approve, what they are told, and a
# shorter wait than the gateway's. Any other member is refused, like an unknown obligation.
_APPROVAL_MEMBERS = {"groups", "reason", "timeout_seconds"}


def _approval_problem(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return "must be an object with the approvers' groups"
    unknown = sorted(set(value) - _APPROVAL_MEMBERS)
    if unknown:
        return f"has members this gateway cannot carry out: {', '.join(map(str, unknown))}"
    groups = value.get("groups")
    if not (isinstance(groups, list | tuple) and groups and all(isinstance(g, str) and g for g in groups)):
        return "must name the approvers' groups (a non-empty list of group names)"
    if not isinstance(value.get("reason", ""), str):
        return "reason must be a string"
    timeout = value.get("timeout_seconds", 1)
    if not (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0):
        return "timeout_seconds must be a positive number"
    return None
