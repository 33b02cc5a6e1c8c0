"""A policy version is verified before it decides: it compiles, its own tests pass, and every probe
input gets a well-typed decision."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.policy._input import input_problem
from server.policy.bundle import PolicyBundle
from server.policy.verify import PROBES, decision_problem, verify_in_process
from server.settings import REPO_ROOT

ENTRYPOINT = "data.castellan.gateway.decision"


@pytest.fixture(params=["opa-library", "regorus"])
def evaluator(request: pytest.FixtureRequest) -> str:
    """Both evaluators of the embedded engine verify."""
    return str(request.param)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    shutil.copytree(REPO_ROOT / "policies", tmp_path / "policies")
    return tmp_path / "policies"


def edit(policies: Path, old: str, new: str) -> PolicyBundle:
    rego = policies / "castellan" / "gateway.rego"
    text = rego.read_text()
    assert old in text
    rego.write_text(text.replace(old, new))
    return PolicyBundle.from_directory(policies)


def test_every_probe_is_a_valid_decision_input() -> None:
    assert {name: input_problem(doc) for name, doc in PROBES.items()} == dict.fromkeys(PROBES)


def test_the_default_policy_is_fit_to_decide(policies: Path, evaluator: str) -> None:
    assert verify_in_process(PolicyBundle.from_directory(policies), ENTRYPOINT, evaluator) == ()


def test_a_deny_rule_that_yields_a_number_is_refused(policies: Path, evaluator: str) -> None:
    # compiles, and is valid Rego; but `reasons` would hold 42 (and today's tests do not notice)
    bundle = edit(policies, "# The meter enforces budgets too", 'deny contains 42 if input.action == "call"\n\n#')
    problems = verify_in_process(bundle, ENTRYPOINT, evaluator)
    assert "probe 'plain call': policy decision 'reasons' is not a set of strings" in problems


def test_reasons_made_a_number_is_refused(policies: Path, evaluator: str) -> None:
    problems = verify_in_process(edit(policies, '"reasons": deny,', '"reasons": count(deny),'), ENTRYPOINT, evaluator)
    assert problems
    # every problem is the ill-typed `reasons`, or the policy's own tests failing on it (OPA's type checker
    # already refuses to compile a test that compares a number with a set)
    assert any("'reasons' is not a set of strings" in p for p in problems)
    assert all(
        "'reasons' is not a set of strings" in p or p.startswith("test ") or "gateway_test.rego does not compile" in p
        for p in problems
    )


def test_an_allow_that_is_not_a_boolean_is_refused(policies: Path, evaluator: str) -> None:
    problems = verify_in_process(edit(policies, '"allow": count(deny) == 0,', '"allow": "yes",'), ENTRYPOINT, evaluator)
    assert "probe 'plain call': policy decision has no boolean 'allow'" in problems


def test_an_undefined_decision_is_refused(policies: Path, evaluator: str) -> None:
    problems = verify_in_process(
        edit(policies, "decision := {", "decision := {} if false\n\nunused := {"), ENTRYPOINT, evaluator
    )
    assert "probe 'list': policy returned no decision (undefined)" in problems


def test_an_edit_that_fails_its_own_tests_is_refused(policies: Path, evaluator: str) -> None:
    data = policies / "castellan" / "config" / "data.json"
    data.write_text(data.read_text().replace('"max_length": {"text": 200}', '"max_length": {"text": 3}'))
    problems = verify_in_process(PolicyBundle.from_directory(policies), ENTRYPOINT, evaluator)
    assert 'test data.castellan.gateway_test.test_echo_is_allowed failed: got "<undefined>"' in problems


def test_a_module_that_does_not_compile_is_refused(policies: Path, evaluator: str) -> None:
    problems = verify_in_process(edit(policies, "count(deny) == 0", "count(deny) =="), ENTRYPOINT, evaluator)
    assert len(problems) == 1
    assert problems[0].startswith("policy castellan/gateway.rego does not compile")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"allow": True, "reasons": [], "obligations": {}}, None),
        ({"allow": False, "reasons": ["b", "a"]}, None),
        (None, "policy returned no decision (undefined)"),
        ([], "policy decision is not an object"),
        ({"allow": 1}, "policy decision has no boolean 'allow'"),
        ({"allow": False, "reasons": [42]}, "policy decision 'reasons' is not a set of strings"),
        ({"allow": False, "reasons": 3}, "policy decision 'reasons' is not a set of strings"),
        ({"allow": True, "obligations": []}, "policy decision 'obligations' is not an object"),
        (
            {"allow": True, "obligations": {"launch": 1}},
            "policy asked for obligation 'launch', which this gateway cannot carry out",
        ),
        (
            {"allow": True, "obligations": {"max_result_chars": -1}},
            "obligation max_result_chars must be a positive number",
        ),
    ],
)
def test_well_typed_means_the_gateway_keeps_what_the_policy_said(raw: object, problem: str | None) -> None:
    assert decision_problem(raw) == problem
