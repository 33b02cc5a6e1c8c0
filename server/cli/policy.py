"""`castellan policy`: test, evaluate and check the Rego policy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from server.cli._common import config_option, settings_from
from server.errors import ConfigError


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


@policy.command("replay")
@config_option
@click.option(
    "--policy", "policy_dir", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The candidate policy directory (as policy.path would name it).",
)  # fmt: skip
@click.option("--since", help="How far back: 24h, 30m, 7d, 2w, or an ISO 8601 time. Default: every recorded call.")
@click.option("--agent", help="Only this agent's calls.")
@click.option("--tool", help="Only calls of this tool.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (for a CI gate).")
@click.option(
    "--fail-on", type=click.Choice(["any", "allow-to-deny", "deny-to-allow", "never"]), default="any",
    show_default=True, help="Which changes make the exit status 2.",
)  # fmt: skip
def policy_replay(
    config: Path | None, policy_dir: Path, since: str | None, agent: str | None, tool: str | None,
    as_json: bool, fail_on: str,
) -> None:  # fmt: skip
    """Decide the recorded calls of the audit outbox again with a candidate policy and print what
    would change (allow to deny, deny to allow, other obligations), grouped by rule and tool.
    Exit status: 0 nothing would change, 2 something would (see --fail-on), 1 an error."""
    import asyncio

    from server.audit.outbox import SqliteOutbox
    from server.policy.bundle import PolicyBundle
    from server.policy.embedded import EmbeddedEngine
    from server.policy.replay import outbox_records, replay, since_time

    settings = settings_from(config)
    try:
        cutoff = since_time(since) if since else None
    except ValueError:
        raise click.BadParameter(
            f"{since!r}: expected 24h, 30m, 7d, 2w or an ISO 8601 time", param_hint="--since"
        ) from None
    audit_db = settings.data_file(settings.audit.path, "audit.db")
    if not audit_db.exists():
        raise click.ClickException(f"no audit outbox at {audit_db}: nothing recorded to replay")

    async def run() -> dict[str, object]:
        from server.audit.keys import ChainKey

        engine = EmbeddedEngine(PolicyBundle.from_directory(policy_dir), settings.policy.entrypoint)
        outbox = SqliteOutbox(audit_db, key=ChainKey.generate())  # reading needs no key
        try:
            report = await replay(outbox_records(outbox.search_async, since=cutoff, agent=agent, tool=tool), engine)
        finally:
            await engine.close()
            await outbox.close()
        return report.as_json()

    try:
        result = asyncio.run(run())
    except ConfigError as exc:
        raise click.ClickException(f"candidate policy {policy_dir}: {exc}") from None
    changes: dict[str, int] = result["changes"]  # type: ignore[assignment]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(_replay_text(result, policy_dir))
    failing = {
        "any": sum(changes.values()),
        "allow-to-deny": changes["allow_to_deny"],
        "deny-to-allow": changes["deny_to_allow"],
        "never": 0,
    }[fail_on]
    sys.exit(2 if failing else 0)


_ARROWS = {"allow_to_deny": "allow -> deny", "deny_to_allow": "deny -> allow", "obligations": "obligations"}


def _replay_text(result: dict[str, object], policy_dir: Path) -> str:
    changes: dict[str, int] = result["changes"]  # type: ignore[assignment]
    skipped: dict[str, int] = result["skipped"]  # type: ignore[assignment]
    groups: list[dict[str, object]] = result["groups"]  # type: ignore[assignment]
    lines = [
        f"replayed {result['replayed']} of {result['examined']} recorded calls with {policy_dir} "
        f"(version {str(result['policy_version'])[:12]}): {sum(changes.values())} would change "
        f"({changes['allow_to_deny']} allow -> deny, {changes['deny_to_allow']} deny -> allow, "
        f"{changes['obligations']} other obligations)"
    ]
    if skipped:
        lines.append("not replayed: " + ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in skipped.items()))
    for group in groups:
        calls: list[str] = group["calls"]  # type: ignore[assignment]
        more = f" (+{len(calls) - 5} more)" if len(calls) > 5 else ""
        arrow, rule = _ARROWS[str(group["change"])], group["rule"] or "-"
        lines.append(f"  {arrow:<14} {group['count']:>5}  tool {group['tool']}  rule: {rule}")
        lines.append(f"  {'':<14}        calls: {', '.join(calls[:5])}{more}")
    return "\n".join(lines)
