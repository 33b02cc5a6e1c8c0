from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from server.policy._result import to_decision


def _decide(raw: Any) -> Any:
    return to_decision(raw, policy_version="v1", engine="embedded", decision_id="d", eval_ms=0.5)


def test_a_plain_allow_is_the_same_decision_whatever_containers_say_it() -> None:
    plain = _decide({"allow": True, "reasons": [], "obligations": {}})
    assert (
        plain
        == _decide({"allow": True})
        == _decide({"allow": True, "reasons": (), "obligations": MappingProxyType({})})
    )
    assert (plain.allow, plain.reasons, plain.obligations, plain.policy_version) == (True, (), {}, "v1")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "policy returned no decision (undefined)"),
        ([], "policy decision is not an object"),
        ({"allow": 1}, "policy decision has no boolean 'allow'"),
        ({"allow": True, "reasons": "no"}, "policy decision 'reasons' is not a set of strings"),
        ({"allow": True, "reasons": [1], "obligations": []}, "policy decision 'reasons' is not a set of strings"),
        ({"allow": True, "obligations": []}, "policy decision 'obligations' is not an object"),
        (
            {"allow": True, "obligations": {"notify": 1}},
            "policy asked for obligation 'notify', which this gateway cannot carry out",
        ),
    ],
)
def test_a_malformed_result_is_a_deny_with_the_first_problem(raw: Any, reason: str) -> None:
    decision = _decide(raw)
    assert (decision.allow, decision.reasons, decision.engine, decision.eval_ms) == (False, (reason,), "embedded", 0.5)


def test_reasons_are_sorted_and_unique_and_obligations_copied() -> None:
    obligations = {"max_result_chars": 10}
    decision = _decide({"allow": False, "reasons": ["b", "a", "b"], "obligations": obligations})
    assert decision.reasons == ("a", "b")
    assert decision.obligations == obligations
    assert decision.obligations is not obligations
