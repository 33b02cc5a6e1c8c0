"""Verification of a policy version before it decides anything: it compiles, passes its own tests, and
answers every probe input with a well-typed decision."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from server.errors import ConfigError
from server.policy._result import to_decision
from server.policy.authoring import run_bundle_tests
from server.policy.bundle import PolicyBundle
from server.policy.embedded import compile_policy
from server.policy.regorus_subset import _clean

_BASE: dict[str, Any] = {
    "identity": {"agent_id": "probe", "subject": "probe", "groups": ["analysts"], "scopes": []},
    "tool": {"name": "echo", "securable": "main.tools.echo", "annotations": {}, "upstream": None},
    "action": "call",
    "arguments": {"text": "probe"},
    "run": {"run_id": "probe", "depth": 0, "calls": 1, "repeats": 1},
    "grants": {"has": ["EXECUTE"], "missing": []},
    "budget": {"tokens_used": 0, "tokens_limit": 1000, "calls_this_minute": 1},
    "time": "2026-01-01T00:00:00Z",
}


def _probe(**changes: Any) -> dict[str, Any]:
    document = copy.deepcopy(_BASE)
    for key, value in changes.items():
        document[key] = {**document[key], **value} if isinstance(value, dict) else value
    return document


# Valid decision inputs (schema v1) that reach different rules: an allow, a list, missing grants, no
# groups, a destructive tool, an upstream tool, odd argument types, an exhausted budget. A policy must
# answer each with a well-typed decision; what it decides is its own business.
PROBES: Mapping[str, Mapping[str, Any]] = {
    "plain call": _probe(),
    "list": _probe(action="list", arguments={}),
    "missing grant": _probe(grants={"has": [], "missing": ["EXECUTE"]}),
    "no groups": _probe(identity={"groups": []}),
    "destructive tool": _probe(
        tool={"name": "demo.reset", "securable": "main.admin.reset_demo", "annotations": {"destructiveHint": True}},
        arguments={},
    ),
    "upstream tool": _probe(tool={"name": "files.read", "securable": "main.upstream.files_read", "upstream": "files"}),
    "odd arguments": _probe(arguments={"text": 42, "n": None, "list": [1, "a"], "obj": {"k": True}}),
    "budget exhausted": _probe(budget={"tokens_used": 1000, "tokens_limit": 1000}),
}


def decision_problem(raw: Any) -> str | None:
    """Why `raw` (the entrypoint's value, `None` when undefined) is not a well-typed decision, or
    None. Well-typed means the gateway's normalisation (`to_decision`) keeps what the policy said,
    rather than replacing it with a deny for a malformed result: one definition of the contract."""
    decision = to_decision(raw, policy_version="", engine="")
    if isinstance(raw, Mapping) and raw.get("allow") is decision.allow:
        said = raw.get("reasons", [])
        if (
            isinstance(said, list)
            and all(isinstance(r, str) for r in said)
            and tuple(sorted(set(said))) == decision.reasons
            and dict(raw.get("obligations", {})) == dict(decision.obligations)
        ):
            return None
    return decision.reasons[0] if decision.reasons else "policy decision is malformed"


def probe_problems(results: Mapping[str, Any]) -> list[str]:
    """One line per probe whose result (probe name → raw result) is not a well-typed decision."""
    return [f"probe '{name}': {problem}" for name, raw in results.items() if (problem := decision_problem(raw))]


def verify_in_process(bundle: PolicyBundle, entrypoint: str, evaluator: str = "") -> tuple[str, ...]:
    """What makes `bundle` unfit to decide in the embedded engine: a module that its evaluator
    (`evaluator`, default the embedded engine's) refuses, a failing `*_test.rego` test, a probe answered
    with an ill-typed decision or an evaluation error. () when fit. Blocking: run it on a worker thread;
    what it compiles is freed on that thread before it returns (regorus engines may not cross threads)."""
    try:
        compiled = compile_policy(bundle, entrypoint, evaluator)
    except ConfigError as exc:
        return (str(exc),)
    results: dict[str, Any] = {}
    problems: list[str] = []
    for name, document in PROBES.items():
        try:
            ok, value = compiled.evaluate(json.dumps(document))
        except Exception as exc:  # as the engine treats it: an error, never a decision
            ok, value = False, f"{type(exc).__name__}: {_clean(exc)}"
        if ok:
            results[name] = value
        else:
            problems.append(f"probe '{name}': evaluation failed: {value}")
    del compiled
    problems += probe_problems(results)
    try:
        tests = run_bundle_tests(bundle)
        failed = [f"test {t.name} failed{': ' + t.detail if t.detail else ''}" for t in tests if not t.passed]
    except ConfigError as exc:
        failed = [str(exc)]
    return tuple(problems + failed)
