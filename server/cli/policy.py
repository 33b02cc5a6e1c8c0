"""`castellan policy`: test, evaluate and check the Rego policy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from server.cli._common import config_option, settings_from
from server.errors import ConfigError

if TYPE_CHECKING:
    pass


@click.group()
def policy() -> None:
    """Test, evaluate and check the Rego policies."""


@policy.command("test")
@config_option
def policy_test(config: Path | None) -> None:
    """Run the policies' *_test.rego tests (opa test when OPA is installed, else in-process)."""
    from server.policy.authoring import run_tests

    settings = settings_from(config)
    try:
        passed, report = run_tests(settings.policy.path, settings.policy.opa_binary)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(report)
    sys.exit(0 if passed else 1)


@policy.command("eval")
@config_option
@click.option(
    "--input",
    "input_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help='A decision input document (JSON), or {"input": ...}.',
)
def policy_eval(config: Path | None, input_file: Path) -> None:
    """Decide one input and say why; with OPA installed, OPA decides it too and any disagreement is shown."""
    import asyncio

    from server.policy.authoring import load_input
    from server.policy.bundle import PolicyBundle
    from server.policy.embedded import EmbeddedEngine
    from server.policy.managed import ManagedOpa, find_opa
    from server.policy.opa import OpaServerEngine

    settings = settings_from(config)

    async def decide() -> dict[str, object]:
        bundle = PolicyBundle.from_directory(settings.policy.path)
        document = load_input(input_file)
        out: dict[str, object] = {}
        embedded = EmbeddedEngine(bundle, settings.policy.entrypoint)
        out["embedded"] = _decision_json(await embedded.decide(document))
        out["embedded_evaluator"] = embedded.evaluator
        await embedded.close()
        binary = find_opa(settings.policy.opa_binary)
        if binary is not None:
            managed = ManagedOpa(binary)
            managed.start()
            opa = OpaServerEngine(
                managed.url, entrypoint=settings.policy.entrypoint, bundle=bundle, on_close=managed.stop
            )
            out["opa"] = _decision_json(await opa.decide(document))
            await opa.close()
            out["engines_agree"] = out["opa"] == out["embedded"]
        return out

    try:
        result = asyncio.run(decide())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2))


def _decision_json(decision: object) -> dict[str, object]:
    from server.policy.engine import Decision

    assert isinstance(decision, Decision)
    return {
        "allow": decision.allow,
        "reasons": list(decision.reasons),
        "obligations": dict(decision.obligations),
        "policy_version": decision.policy_version,
    }


@policy.command("check")
@config_option
def policy_check(config: Path | None) -> None:
    """Compile the policies; with OPA, also opa check --strict and opa fmt; an error when the embedded
    engine would refuse them (a builtin or construct it cannot decide exactly as OPA)."""
    from server.policy.authoring import check_policies

    settings = settings_from(config)
    report = check_policies(settings.policy.path, settings.policy.opa_binary, settings.policy.entrypoint)
    exact = "OPA's own evaluator, in-process" if report.evaluator == "opa-library" else "verified subset only"
    if report.evaluator:
        click.echo(f"embedded engine: {report.evaluator} ({exact})")
    for notice in report.notices:
        click.echo(f"notice: {notice}")
    for error in report.errors:
        click.echo(f"error: {error}", err=True)
    click.echo("policy check: " + ("failed" if report.errors else "ok"))
    sys.exit(1 if report.errors else 0)
