"""For policy authors: run the Rego tests, evaluate one input, and check a policy directory."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from server.errors import ConfigError
from server.policy.bundle import PolicyBundle, package_of
from server.policy.decision_log import MASK_RULE
from server.policy.embedded import compile_policy, default_evaluator
from server.policy.managed import find_opa
from server.policy.regorus_subset import _clean

_TEST_RULE = re.compile(r"^(test_\w+)\s+(?:if\b|:=|=|\{)", re.MULTILINE)


@dataclass
class TestResult:
    name: str
    passed: bool
    detail: str = ""


def test_rules(module: str) -> list[str]:
    """The `test_*` rules a test module defines, each once, as `data.<package>.<rule>`."""
    package = package_of(module)
    return [f"data.{package}.{rule}" for rule in dict.fromkeys(_TEST_RULE.findall(module))] if package else []


def run_tests_in_process(root: Path) -> list[TestResult]:
    """Every `test_*` rule of every `*_test.rego`, evaluated in-process with the modules under `root`."""
    return run_bundle_tests(PolicyBundle.from_directory(root))


def run_bundle_tests(bundle: PolicyBundle) -> list[TestResult]:
    """Every `test_*` rule of the bundle's tests, evaluated in-process with its modules and data: by the OPA
    library when it is built, else by regorus (all of Rego: tests are not decisions). Raises `ConfigError`
    when a module or test does not compile. Call it from one thread: a regorus engine is made and freed here."""
    if default_evaluator() != "opa-library":
        return _run_tests_with_regorus(bundle)
    with_tests = replace(bundle, modules={**bundle.modules, **bundle.tests})
    rules = [name for text in bundle.tests.values() for name in test_rules(text)]
    if not rules:
        compile_policy(with_tests, "data")  # still compile everything
    results = []
    for name in rules:
        ok, value = compile_policy(with_tests, name).evaluate("null")
        passed = ok and value is True
        shown = ('"<undefined>"' if value is None else json.dumps(value)) if ok else f"error: {value}"
        results.append(TestResult(name, passed, "" if passed else f"got {shown}"))  # as regorus reports it
    return results


def _run_tests_with_regorus(bundle: PolicyBundle) -> list[TestResult]:
    import regorus

    engine = regorus.Engine()
    problem = None
    for path, text in {**bundle.modules, **bundle.tests}.items():
        try:
            engine.add_policy(path, text)
        except Exception as exc:
            problem = f"policy {path} does not compile: {_clean(exc)}"
            break
    if problem is not None:
        del engine  # freed on this thread, not later by garbage collection elsewhere
        raise ConfigError(problem)
    engine.add_data_json(json.dumps(bundle.data))
    results = []
    for text in bundle.tests.values():
        for name in test_rules(text):
            try:
                value = engine.eval_rule_as_json(name)
                results.append(TestResult(name, value == "true", "" if value == "true" else f"got {value}"))
            except Exception as exc:
                results.append(TestResult(name, False, _clean(exc)))
    del engine
    return results


def run_tests(root: Path, opa_binary: str = "") -> tuple[bool, str]:
    """`opa test` when an OPA binary is available, else the in-process runner. Returns (passed, report)."""
    binary = find_opa(opa_binary)
    if binary is not None:
        done = subprocess.run([binary, "test", str(root), "-v"], capture_output=True, text=True, check=False)
        return done.returncode == 0, f"(opa test)\n{done.stdout}{done.stderr}"
    results = run_tests_in_process(root)
    lines = [f"{'PASS' if r.passed else 'FAIL'} {r.name}{': ' + r.detail if r.detail else ''}" for r in results]
    passed = sum(r.passed for r in results)
    lines.append(f"(in-process {default_evaluator()}) PASS: {passed}/{len(results)}")
    return bool(results) and passed == len(results), "\n".join(lines)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    evaluator: str = ""
    """The embedded engine's evaluator that checked: `opa-library` (exact by construction) or `regorus`."""


def check_policies(
    root: Path, opa_binary: str = "", entrypoint: str = "data.castellan.gateway.decision"
) -> CheckReport:
    """Compile everything; with OPA also `opa check --strict` and `opa fmt --fail`. An error when the
    embedded engine would refuse the policy (naming the builtin or construct), since it then cannot
    decide it exactly as OPA; notices when the regorus fallback serves, or would refuse the policy."""
    report = CheckReport(evaluator=default_evaluator())
    try:
        bundle = PolicyBundle.from_directory(root)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    try:
        run_tests_in_process(root)  # compiles modules and tests together, with the embedded evaluator
        compiled = True
    except ConfigError as exc:
        report.errors.append(f"embedded engine ({report.evaluator}): {exc}")
        compiled = False
    binary = find_opa(opa_binary)
    if binary is not None:
        for args in (["check", "--strict", str(root)], ["fmt", "--fail", "-l", str(root)]):
            done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                report.errors.append(f"opa {args[0]}: {(done.stdout + done.stderr).strip()}")
    else:
        report.notices.append("no OPA binary found: checked with the embedded engine only")
    evaluator = report.evaluator
    has_mask = any(package_of(t) == "system.log" for t in bundle.modules.values())
    entrypoints = [entrypoint, MASK_RULE] if has_mask else [entrypoint]
    for rule in entrypoints if compiled else []:
        try:
            compile_policy(bundle, rule, evaluator)
        except ConfigError as exc:
            report.errors.append(f"embedded engine ({evaluator}): {exc}")
    if evaluator == "opa-library":
        for rule in entrypoints:
            try:
                compile_policy(bundle, rule, "regorus")
            except ConfigError as exc:
                report.notices.append(f"where the OPA library is not built (regorus fallback): {exc}")
    else:
        report.notices.append(
            "embedded engine: regorus restricted to its verified subset (the OPA library is not built: "
            "scripts/build-opa-library needs Go)"
        )
    report.errors = list(dict.fromkeys(report.errors))
    report.notices = list(dict.fromkeys(report.notices))
    return report


def load_input(path: Path) -> Any:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read input {path}: {exc}") from None
    return document.get("input", document) if isinstance(document, dict) else document
