"""For policy authors: run the Rego tests, evaluate one input, and check a policy directory."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConfigError
from server.policy.bundle import PolicyBundle, package_of
from server.policy.embedded import _clean
from server.policy.managed import find_opa

_TEST_RULE = re.compile(r"^(test_\w+)\s+(?:if\b|:=|=|\{)", re.MULTILINE)
# Constructs on which the embedded engine is known to decide differently from OPA for some inputs
# (tests/integration/engine_divergences.json; docs/policy-engines.md).
_DIVERGENT = {
    r"\bto_number\(": "to_number: OPA and the embedded engine accept different spellings ('+5', '.5', ' 5')",
    r"sprintf\([^)]*%[vfge]": "sprintf %v/%f/%g/%e: non-integer numbers outside [1e-4, 1e6) and non-printable "
    "characters inside composite values print differently in the two engines",
}


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
    """Every `test_*` rule of every `*_test.rego`, evaluated by regorus with the modules under `root`."""
    return run_bundle_tests(PolicyBundle.from_directory(root))


def run_bundle_tests(bundle: PolicyBundle) -> list[TestResult]:
    """Every `test_*` rule of the bundle's tests, evaluated by regorus with its modules and data.
    Raises `ConfigError` when a module or test does not compile. Call it from one thread: the
    regorus engine is made and freed here."""
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
    lines.append(f"(in-process regorus) PASS: {passed}/{len(results)}")
    return bool(results) and passed == len(results), "\n".join(lines)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def check_policies(root: Path, opa_binary: str = "") -> CheckReport:
    """Compile everything; with OPA also `opa check --strict` and `opa fmt --fail`; and notices for
    constructs that the two engines decide differently on some inputs."""
    report = CheckReport()
    try:
        bundle = PolicyBundle.from_directory(root)
        run_tests_in_process(root)  # compiles modules and tests together with regorus
    except ConfigError as exc:
        report.errors.append(str(exc))
        return report
    binary = find_opa(opa_binary)
    if binary is not None:
        for args in (["check", "--strict", str(root)], ["fmt", "--fail", "-l", str(root)]):
            done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                report.errors.append(f"opa {args[0]}: {(done.stdout + done.stderr).strip()}")
    else:
        report.notices.append("no OPA binary found: checked with the embedded engine only")
    for path, text in bundle.modules.items():
        for pattern, why in _DIVERGENT.items():
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                report.notices.append(f"{path}:{line}: {why}")
    return report


def load_input(path: Path) -> Any:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read input {path}: {exc}") from None
    return document.get("input", document) if isinstance(document, dict) else document
