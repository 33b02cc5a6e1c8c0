"""The `castellan` command: serve, token, check-config."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.errors import CastellanError, ConfigError
from server.settings import Settings, load_settings

if TYPE_CHECKING:
    from server.audit.outbox import SqliteOutbox
    from server.grants.local import LocalCatalog


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
    from server.logs import configure_logging

    # Commands print their results on stdout; logs go to stderr, warnings and up (`serve` reconfigures).
    configure_logging("auto", "warning")


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


@main.command()
@config_option
@click.option("--agent", required=True, help="Agent id.")
@click.option("--groups", default="", help="Comma-separated groups, to resolve group limits as for its token.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def usage(config: Path | None, agent: str, groups: str, as_json: bool) -> None:
    """Show an agent's consumption against its limits (from the configured meter store)."""
    import asyncio

    from server import backends
    from server.identity import Identity
    from server.metering.limits import resolve_limits
    from server.metering.usage import usage_document, usage_table

    settings = _settings(config)
    identity = Identity(agent_id=agent, subject=agent, issuer="", groups=tuple(g for g in groups.split(",") if g))

    async def read() -> object:
        meter = backends.make_meter(settings)
        try:
            return await meter.usage(agent, resolve_limits(settings.metering, identity))
        finally:
            await meter.close()

    try:
        report = asyncio.run(read())
    except (ConfigError, CastellanError) as exc:
        raise click.ClickException(str(exc)) from None
    from server.metering.meter import Usage

    assert isinstance(report, Usage)
    click.echo(json.dumps(usage_document(report), indent=2) if as_json else usage_table(report))


def _outbox(config: Path | None) -> SqliteOutbox:
    from server.audit.outbox import SqliteOutbox

    settings = _settings(config)
    return SqliteOutbox(settings.data_file(settings.audit.path, "audit.db"))


@main.group()
def audit() -> None:
    """Search, show and verify the audit log (the local outbox; search also the MLflow traces)."""


@audit.command("verify")
@config_option
def audit_verify(config: Path | None) -> None:
    """Check the hash chain: any edited, deleted or reordered record is reported with its position."""
    result = _outbox(config).verify()
    for problem in result.breaks:
        click.echo(f"record {problem.seq}: {problem.problem}", err=True)
    click.echo(
        f"{result.records} records, chain head {result.head[:16]}…: "
        + ("intact" if result.intact else f"{len(result.breaks)} problem(s)")
    )
    sys.exit(0 if result.intact else 1)


@audit.command("search")
@config_option
@click.option("--agent")
@click.option("--subject")
@click.option("--tool")
@click.option("--decision", type=click.Choice(["allow", "deny", "error"]))
@click.option("--reason", help="Text anywhere in the reasons.")
@click.option("--policy-version")
@click.option("--run-id")
@click.option("--flag", help="A flag on the result, e.g. prompt_injection.")
@click.option("--since", help="ISO 8601 time (inclusive).")
@click.option("--until", help="ISO 8601 time (exclusive).")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--offset", type=int, default=0, help="Skip this many (paging).")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "jsonl", "csv", "parquet"]), default="table", show_default=True
)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file (parquet: required)."
)
@click.option(
    "--source",
    type=click.Choice(["outbox", "mlflow"]),
    default="outbox",
    show_default=True,
    help="The local outbox, or the central store: the MLflow traces (audit.mlflow_tracking_uri).",
)
def audit_search(config: Path | None, fmt: str, output: Path | None, source: str, **filters: Any) -> None:
    """Calls matching every filter, newest first."""
    from server.audit.search import AuditQuery, render, write_parquet

    if fmt == "parquet" and output is None:
        raise click.ClickException("--format parquet needs --output FILE")
    query = AuditQuery(**filters)
    try:
        if source == "mlflow":
            from server.audit.mlflow_target import MlflowTarget, local_tracking_uri

            settings = _settings(config)
            uri = settings.audit.mlflow_tracking_uri or local_tracking_uri(settings.data_dir)
            if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
                raise click.ClickException(f"no MLflow store at {uri} yet: the gateway has not shipped anything")
            results = MlflowTarget(uri, settings.audit.mlflow_experiment).search(query)
        else:
            results = _outbox(config).search(query)
    except ValueError as exc:
        raise click.ClickException(f"bad filter: {exc}") from None
    except click.ClickException:
        raise
    except Exception as exc:
        if source != "mlflow":
            raise
        raise click.ClickException(f"MLflow search failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    if fmt == "parquet":
        assert output is not None
        write_parquet(results, output)
        click.echo(f"{len(results)} calls written to {output}", err=True)
    elif output is not None:
        output.write_text(render(results, fmt))
    else:
        click.echo(render(results, fmt), nl=False)


@audit.command("show")
@config_option
@click.argument("call_id")
def audit_show(config: Path | None, call_id: str) -> None:
    """One call in full: its decision and outcome records, with their positions and hashes."""
    record = _outbox(config).show(call_id)
    if record is None:
        raise click.ClickException(f"no call {call_id}")
    click.echo(json.dumps(record, indent=2))


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


def _catalog(config: Path | None) -> LocalCatalog:
    from server.grants.local import LocalCatalog

    settings = _settings(config)
    if settings.grants.backend != "local":
        raise click.ClickException("castellan grants manages the local catalog; for Databricks use its own tools")
    return LocalCatalog(settings.data_file(settings.grants.path, "catalog.db"))


def _admin(action: Callable[[], object], message: str | None = None) -> None:
    """Run an admin action; a `ConfigError` becomes a clean CLI error. Prints the lines it returns,
    or `message`."""
    try:
        result = action()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    lines = result if isinstance(result, list) else [message] if message else []
    for line in lines:
        click.echo(line)


@main.group()
def grants() -> None:
    """Manage the local catalog: grants, securables, owners, principals, group membership.

    Changes reach a running gateway within its grants cache TTL (grants.cache_ttl_seconds)."""


@grants.command("grant", context_settings={"ignore_unknown_options": True})
@config_option
@click.argument("statement", nargs=-1, required=True)
def grants_grant(config: Path | None, statement: tuple[str, ...]) -> None:
    """PRIVILEGE[, PRIVILEGE] ON TYPE NAME TO PRINCIPAL, e.g. EXECUTE ON FUNCTION main.tools.sql TO analysts."""
    from server.grants import admin

    catalog = _catalog(config)
    _admin(lambda: admin.grant(catalog, admin.parse(statement, "TO")))


@grants.command("revoke", context_settings={"ignore_unknown_options": True})
@config_option
@click.argument("statement", nargs=-1, required=True)
def grants_revoke(config: Path | None, statement: tuple[str, ...]) -> None:
    """PRIVILEGE[, PRIVILEGE] ON TYPE NAME FROM PRINCIPAL."""
    from server.grants import admin

    catalog = _catalog(config)
    _admin(lambda: admin.revoke(catalog, admin.parse(statement, "FROM")))


@grants.command("show")
@config_option
@click.option("--principal", default=None, help="Grants made to this principal.")
@click.option("--securable", default=None, help="Grants made on this securable.")
@click.option("--effective", is_flag=True, help="With both: what the principal holds there, and from where.")
def grants_show(config: Path | None, principal: str | None, securable: str | None, effective: bool) -> None:
    """List grants (direct by default; --effective adds inheritance, groups and ownership)."""
    catalog = _catalog(config)
    if effective:
        if not (principal and securable):
            raise click.ClickException("--effective needs --principal and --securable")
        for held in catalog.effective_detail([principal], securable):
            source = (
                f"inherited from {held.inherited_from_type} {held.inherited_from}" if held.inherited_from else "direct"
            )
            click.echo(f"{held.privilege}\t{securable}\t{source}")
        return
    for grant in catalog.grants(principal=principal, securable=securable):
        click.echo(f"{grant.principal}\t{grant.privilege}\t{grant.securable}")


@grants.command("securable")
@config_option
@click.argument("action", type=click.Choice(["add"]))
@click.argument("securable_type", type=click.Choice(["CATALOG", "SCHEMA", "FUNCTION", "TABLE"], case_sensitive=False))
@click.argument("name")
@click.option("--owner", default=None)
def grants_securable(config: Path | None, action: str, securable_type: str, name: str, owner: str | None) -> None:
    """add TYPE NAME [--owner P]: create a securable (and missing parents)."""
    catalog = _catalog(config)
    _admin(lambda: catalog.add_securable(securable_type, name, owner), f"CREATE {securable_type.upper()} {name}")


@grants.command("owner")
@config_option
@click.argument("securable_type", type=click.Choice(["CATALOG", "SCHEMA", "FUNCTION", "TABLE"], case_sensitive=False))
@click.argument("name")
@click.argument("to", type=click.Choice(["TO", "to"]))
@click.argument("principal")
def grants_owner(config: Path | None, securable_type: str, name: str, to: str, principal: str) -> None:
    """TYPE NAME TO PRINCIPAL: make PRINCIPAL the owner (all privileges on that object)."""
    catalog = _catalog(config)
    _admin(lambda: catalog.set_owner(name, principal), f"ALTER {securable_type.upper()} {name} OWNER TO {principal}")


@grants.command("principal")
@config_option
@click.argument("action", type=click.Choice(["add"]))
@click.argument("name")
@click.option("--kind", type=click.Choice(["user", "group", "service_principal"]), required=True)
def grants_principal(config: Path | None, action: str, name: str, kind: str) -> None:
    """add NAME --kind user|group|service_principal."""
    catalog = _catalog(config)
    _admin(lambda: catalog.add_principal(name, kind), f"principal {name} ({kind})")


@grants.command("member")
@config_option
@click.argument("action", type=click.Choice(["add", "remove"]))
@click.argument("member")
@click.argument("preposition", type=click.Choice(["TO", "FROM", "to", "from"]))
@click.argument("group")
def grants_member(config: Path | None, action: str, member: str, preposition: str, group: str) -> None:
    """add MEMBER TO GROUP | remove MEMBER FROM GROUP (groups may contain groups)."""
    catalog = _catalog(config)
    if action == "add":
        _admin(lambda: catalog.add_member(member, group), f"{member} is now in {group}")
    else:
        removed = catalog.remove_member(member, group)
        click.echo(f"{member} removed from {group}" if removed else "(not a member)")


@grants.command("export")
@config_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False), required=False)
def grants_export(config: Path | None, file: Path | None) -> None:
    """Write the whole catalog as JSON (to FILE or stdout), deterministic for review in a pull request."""
    catalog = _catalog(config)
    text = catalog.dumps(catalog.export())
    if file is None:
        click.echo(text, nl=False)
    else:
        file.write_text(text)


@grants.command("import")
@config_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def grants_import(config: Path | None, file: Path) -> None:
    """Make the catalog exactly FILE (an export), in one transaction: invalid means nothing changes."""
    catalog = _catalog(config)
    try:
        document = json.loads(file.read_text())
    except ValueError as exc:
        raise click.ClickException(f"{file} is not JSON: {exc}") from None
    _admin(lambda: catalog.replace_all(document), f"imported {sum(len(v) for v in document.values())} entries")


if __name__ == "__main__":
    main()


@main.group()
def tools() -> None:
    """Upstream tool pins (quarantine and approval) and the demo data."""


@tools.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
def tools_list(config: Path | None, as_json: bool) -> None:
    """Every upstream tool seen, with its pin status (approved or quarantined)."""
    from server.upstream.pins import PinStore

    store = PinStore(_settings(config).data_dir / "upstream_pins.db")
    pins = store.list()
    store.close()
    if as_json:
        click.echo(json.dumps([_pin_dict(p) for p in pins], indent=2))
        return
    for pin in pins:
        click.echo(f"{pin.tool:40}  {pin.status:11}  {pin.seen_hash[:12]}  approved by {pin.approved_by or '-'}")


def _pin_dict(pin: Any) -> dict[str, Any]:
    return {name: getattr(pin, name) for name in pin.__slots__}


@tools.command("approve")
@config_option
@click.argument("names", nargs=-1, required=True)
@click.option("--by", default=lambda: os.environ.get("USER", "admin"), help="Who approves (recorded).")
def tools_approve(config: Path | None, names: tuple[str, ...], by: str) -> None:
    """Approve the current definition of upstream tools NAMES (e.g. files.read_file): served again
    at the gateway's next upstream refresh."""
    from server.upstream.pins import PinStore

    store = PinStore(_settings(config).data_dir / "upstream_pins.db")
    try:
        for name in names:
            try:
                pin = store.approve(name, by)
            except KeyError:
                raise click.ClickException(f"no upstream tool {name} has been seen") from None
            click.echo(f"approved {pin.tool} (definition {pin.seen_hash[:12]}) by {by}")
    finally:
        store.close()


@tools.command("show")
@config_option
@click.argument("name")
def tools_show(config: Path | None, name: str) -> None:
    """The definition an upstream tool offers now, and whether it is the approved one."""
    from server.upstream.pins import PinStore

    store = PinStore(_settings(config).data_dir / "upstream_pins.db")
    found = [p for p in store.list() if p.tool == name]
    store.close()
    if not found:
        raise click.ClickException(f"no upstream tool {name} has been seen")
    click.echo(json.dumps(_pin_dict(found[0]), indent=2))


@main.command("demo-data")
@config_option
@click.option("--overwrite", is_flag=True, help="Recreate the tables even when they exist.")
def demo_data(config: Path | None, overwrite: bool) -> None:
    """Create the demo Delta tables (sales orders and customers, support documents)."""
    from tools.catalog_tools import table_catalog
    from tools.demo_data import create_demo_data

    tables = table_catalog(_settings(config))
    created = create_demo_data(tables.root, overwrite=overwrite)
    click.echo(f"{len(created)} tables created under {tables.root}: {', '.join(created) or '(all existed)'}")


@main.command()
@click.argument("url")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file holding the bearer token (default: $CASTELLAN_TOKEN).")  # fmt: skip
def connect(url: str, token_file: Path | None) -> None:
    """Bridge stdio to the gateway at URL, for MCP clients that only speak stdio (desktop agents).

    The token comes from --token-file or $CASTELLAN_TOKEN; logs go to stderr, stdout is the protocol."""
    import anyio

    from server.connect import bridge

    token = token_file.read_text().strip() if token_file else os.environ.get("CASTELLAN_TOKEN", "").strip()
    if not token:
        raise click.ClickException("no token: set CASTELLAN_TOKEN or pass --token-file")
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(bridge, url, token)


@main.command()
@config_option
def ship(config: Path | None) -> None:
    """Ship the audit outbox to MLflow until stopped (SIGTERM/SIGINT). The gateway runs this as a
    supervised child process; run it yourself to ship from a host where no gateway runs."""
    import asyncio
    import signal

    from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
    from server.audit.outbox import SqliteOutbox
    from server.audit.ship_process import SETTINGS_ENV
    from server.audit.shipper import Shipper
    from server.logs import configure_logging
    from server.metrics import Metrics
    from server.settings import AuditSettings

    given = os.environ.get(SETTINGS_ENV)
    if given:  # from the supervising gateway
        document = json.loads(given)
        audit, data_dir, audit_db = (
            AuditSettings(**document["audit"]),
            Path(document["data_dir"]),
            Path(document["audit_db"]),
        )
        configure_logging("json", "info")
    else:
        settings = _settings(config)
        audit, data_dir = settings.audit, settings.data_dir
        audit_db = settings.data_file(audit.path, "audit.db")
        configure_logging(settings.log_format, settings.log_level)
    uri = audit.mlflow_tracking_uri or local_tracking_uri(data_dir)

    async def run() -> None:
        outbox = SqliteOutbox(audit_db)
        shipper = Shipper(outbox, MlflowTarget(uri, audit.mlflow_experiment), audit, Metrics(),
                          status_file=data_dir / "shipper-status.json")  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        shipper.start()
        await stop.wait()
        await shipper.stop(drain_seconds=5.0)
        await outbox.close()

    asyncio.run(run())
