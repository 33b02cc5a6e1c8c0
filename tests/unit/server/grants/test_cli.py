"""`castellan grants` on a local catalog, without a gateway: principals have one kind, grants go only
to registered principals, and `show --effective` answers for the kind asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from server.cli import main


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CASTELLAN_DATA_DIR", str(tmp_path))
    runner = CliRunner()

    def invoke(*words: str, ok: bool = True) -> str:
        result = runner.invoke(main, ["grants", *words])
        assert (result.exit_code == 0) is ok, result.output
        return result.output

    invoke("securable", "add", "FUNCTION", "main.tools.echo")
    return invoke


def test_a_grant_needs_a_registered_principal_or_a_kind(run) -> None:  # type: ignore[no-untyped-def]
    refused = run("grant", "EXECUTE", "ON", "FUNCTION", "main.tools.echo", "TO", "ops", ok=False)
    assert "no principal 'ops'" in refused
    assert "castellan grants principal add ops --kind" in refused
    assert run("grant", "--kind", "group", "EXECUTE", "ON", "FUNCTION", "main.tools.echo", "TO", "ops").strip() == (
        "GRANT EXECUTE ON FUNCTION main.tools.echo TO ops"
    )
    assert "ops\tEXECUTE\tmain.tools.echo\tgroup" in run("show", "--principal", "ops")


def test_a_name_keeps_its_kind_and_show_answers_per_kind(run) -> None:  # type: ignore[no-untyped-def]
    run("principal", "add", "ops", "--kind", "group")
    assert "already a group" in run("principal", "add", "ops", "--kind", "user", ok=False)
    run("grant", "EXECUTE", "ON", "FUNCTION", "main.tools.echo", "TO", "ops")
    as_group = run("show", "--principal", "ops", "--securable", "main.tools.echo", "--effective")
    assert "EXECUTE\tmain.tools.echo\tdirect" in as_group
    as_user = run("show", "--principal", "ops", "--kind", "user", "--securable", "main.tools.echo", "--effective")
    assert "EXECUTE" not in as_user
    assert "ops\tgroup" in run("principal", "list").splitlines()
    assert "cannot be a member of itself" in run("member", "add", "ops", "TO", "ops", ok=False)
    run("principal", "add", "alice", "--kind", "user")
    assert "'alice' is a user, not a group" in run("member", "add", "ops", "TO", "alice", ok=False)
