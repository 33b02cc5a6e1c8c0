"""`castellan policy check` reports a policy the embedded engine refuses as an error (naming the
builtin), for whichever evaluator serves; and names the evaluator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.policy import inprocess_opa
from server.policy.authoring import check_policies
from server.settings import REPO_ROOT


def policies_with(tmp_path: Path, rego: str) -> Path:
    root = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", root)
    (root / "castellan" / "extra.rego").write_text(f"package castellan.gateway\n\nimport rego.v1\n\n{rego}\n")
    return root


def test_the_shipped_policies_check_clean_on_both_evaluators(monkeypatch: pytest.MonkeyPatch) -> None:
    report = check_policies(REPO_ROOT / "policies")
    assert report.errors == []
    monkeypatch.setenv("CASTELLAN_OPA_LIBRARY", "")
    fallback = check_policies(REPO_ROOT / "policies")
    assert (fallback.evaluator, fallback.errors) == ("regorus", [])
    assert any("regorus restricted to its verified subset" in n for n in fallback.notices)


def test_a_refused_network_builtin_is_an_error_for_the_opa_library(tmp_path: Path) -> None:
    if not inprocess_opa.available():
        pytest.skip("the OPA library is not built (needs Go)")
    report = check_policies(policies_with(tmp_path, 'deny contains "x" if http.send({"method": "get", "url": "u"})'))
    assert report.evaluator == "opa-library"
    assert any("uses builtin http.send, which the embedded engine refuses" in e for e in report.errors)


def test_a_builtin_outside_the_verified_subset_is_an_error_for_regorus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = policies_with(tmp_path, 'deny contains "x" if regex.match(`^\\w+$`, input.arguments.text)')
    monkeypatch.setenv("CASTELLAN_OPA_LIBRARY", "")
    report = check_policies(root)
    assert report.evaluator == "regorus"
    assert any("builtin regex.match (castellan/extra.rego:5)" in e for e in report.errors)
    monkeypatch.delenv("CASTELLAN_OPA_LIBRARY")
    if inprocess_opa.available():  # the library accepts it, and says what the fallback would do
        exact = check_policies(root)
        assert exact.errors == []
        assert any("regorus fallback" in n and "regex.match" in n for n in exact.notices)
