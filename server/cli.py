"""The `castellan` command: serve, token, check-config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from server.errors import ConfigError
from server.settings import Settings, load_settings


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML settings file (default: $CASTELLAN_CONFIG, else ./castellan.toml when present).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="castellan")
def main() -> None:
    """Castellan: a governance-first MCP gateway."""


@main.command()
@config_option
@click.option("--host", default=None, help="Bind address (default from settings: 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default from settings: 8750).")
def serve(config: Path | None, host: str | None, port: int | None) -> None:
    """Start the gateway. With no settings at all: embedded engines, SQLite stores, demo tools."""
    import uvicorn

    from server.app import create_app
    from server.logs import configure_logging

    overrides: dict[str, object] = {}
    if host or port:
        base = _settings(config).server
        overrides["server"] = base.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v})
    try:
        settings = load_settings(config, **overrides)
        configure_logging(settings.log_format, settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        limit_concurrency=2048,
        server_header=False,
    )


@main.command()
@config_option
@click.option("--agent", required=True, help="Agent id (the metering and audit key).")
@click.option("--groups", default="", help="Comma-separated groups, e.g. analysts,admins.")
@click.option("--scopes", default="", help="Comma-separated scopes.")
@click.option("--subject", default=None, help="The human or service the agent acts for (default: the agent).")
@click.option("--ttl", type=int, default=None, help="Lifetime in seconds (default from settings: 3600).")
def token(config: Path | None, agent: str, groups: str, scopes: str, subject: str | None, ttl: int | None) -> None:
    """Mint a short-lived dev token for this gateway (dev mode only)."""
    from server.auth.devkeys import mint_dev_token

    settings = _settings(config)
    if settings.auth.mode != "dev":
        raise click.ClickException("castellan token works in dev mode only (auth.mode = 'dev')")
    click.echo(
        mint_dev_token(
            settings.data_dir,
            agent=agent,
            issuer=settings.auth.issuer,
            audience=settings.audience,
            groups=[g.strip() for g in groups.split(",") if g.strip()],
            scopes=[s.strip() for s in scopes.split(",") if s.strip()],
            subject=subject,
            ttl_seconds=ttl or settings.auth.dev_token_ttl_seconds,
        )
    )


@main.command("check-config")
@config_option
def check_config(config: Path | None) -> None:
    """Validate the settings and build every backend; print the resolved settings."""
    import asyncio

    from server.gateway import build_gateway

    settings = _settings(config)
    try:
        gateway = build_gateway(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    checks = asyncio.run(gateway.readiness())
    asyncio.run(gateway.close())
    click.echo(json.dumps({"settings": json.loads(settings.model_dump_json()), "checks": checks}, indent=2))
    if any(v != "ok" for v in checks.values()):
        sys.exit(1)


@main.group()
def policy() -> None:
    """Test, evaluate and check the Rego policies."""


@policy.command("test")
@config_option
def policy_test(config: Path | None) -> None:
    """Run the policies' *_test.rego tests (opa test when OPA is installed, else in-process)."""
    from server.policy.authoring import run_tests

    settings = _settings(config)
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

    settings = _settings(config)

    async def decide() -> dict[str, object]:
        bundle = PolicyBundle.from_directory(settings.policy.path)
        document = load_input(input_file)
        out: dict[str, object] = {}
        embedded = EmbeddedEngine(bundle, settings.policy.entrypoint)
        out["embedded"] = _decision_json(await embedded.decide(document))
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
    """Compile the policies; with OPA, also opa check --strict and opa fmt; list constructs the engines
    decide differently on some inputs."""
    from server.policy.authoring import check_policies

    settings = _settings(config)
    report = check_policies(settings.policy.path, settings.policy.opa_binary)
    for notice in report.notices:
        click.echo(f"notice: {notice}")
    for error in report.errors:
        click.echo(f"error: {error}", err=True)
    click.echo("policy check: " + ("failed" if report.errors else "ok"))
    sys.exit(1 if report.errors else 0)


if __name__ == "__main__":
    main()
