"""`require_approval` as the decision normaliser reads it: well-formed passes, anything else denies."""

from __future__ import annotations

from typing import Any

import pytest

from server.policy._result import to_decision
from server.policy.obligations import ApprovalObligation, approval_obligation


def decide(obligation: Any) -> Any:
    return to_decision(
        {"allow": True, "reasons": [], "obligations": {"require_approval": obligation}}, policy_version="v", engine="t"
    )


def test_a_well_formed_approval_obligation_is_kept() -> None:
    decision = decide({"groups": ["admins", "leads"], "reason": "irreversible", "timeout_seconds": 60})
    assert decision.allow
    assert approval_obligation(decision) == ApprovalObligation(("admins", "leads"), "irreversible", 60.0)


@pytest.mark.parametrize(
    ("obligation", "problem"),
    [
        (True, "must be an object"),
        ({}, "must name the approvers' groups"),
        ({"groups": []}, "must name the approvers' groups"),
        ({"groups": "admins"}, "must name the approvers' groups"),
        ({"groups": ["admins", 3]}, "must name the approvers' groups"),
        ({"groups": [""]}, "must name the approvers' groups"),
        ({"groups": ["admins"], "reason": 42}, "reason must be a string"),
        ({"groups": ["admins"], "timeout_seconds": 0}, "timeout_seconds must be a positive number"),
        ({"groups": ["admins"], "timeout_seconds": True}, "timeout_seconds must be a positive number"),
        ({"groups": ["admins"], "quorum": 2}, "cannot carry out: quorum"),
    ],
)
def test_a_malformed_approval_obligation_denies(obligation: Any, problem: str) -> None:
    decision = decide(obligation)
    assert not decision.allow
    (reason,) = decision.reasons
    assert reason.startswith("obligation require_approval ")
    assert problem in reason
