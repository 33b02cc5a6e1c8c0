"""The policies in policies/ pass OPA's own gates: opa test, opa check --strict, opa fmt; and
`castellan policy test` agrees when run in-process without OPA."""

from __future__ import annotations

import subprocess

import pytest

from server.policy.authoring import check_policies, run_tests_in_process
from server.settings import REPO_ROOT
from tests.opa import opa_binary

pytestmark = pytest.mark.integration
POLICIES = str(REPO_ROOT / "policies")


def opa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([opa_binary(), *args], capture_output=True, text=True, check=False, timeout=120)


def test_opa_test_passes() -> None:
    done = opa("test", POLICIES, "-v")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout


def test_opa_check_strict_passes() -> None:
    done = opa("check", "--strict", POLICIES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_opa_fmt_has_nothing_to_change() -> None:
    done = opa("fmt", "--fail", "-l", POLICIES)
    assert done.returncode == 0, f"not formatted: {done.stdout}"


def test_the_in_process_runner_passes_the_same_tests() -> None:
    results = run_tests_in_process(REPO_ROOT / "policies")
    assert len(results) >= 12
    assert [r.name for r in results if not r.passed] == []


def test_policy_check_is_clean_for_the_shipped_policies() -> None:
    report = check_policies(REPO_ROOT / "policies", opa_binary())
    assert report.errors == []
    assert report.notices == []
