"""Running the gateway and its helpers: serve, ship, connect (the stdio bridge), demo-data."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.cli._common import config_option, settings_from
from server.errors import ConfigError
from server.settings import SERVING_FILE, Settings, load_settings

if TYPE_CHECKING:
    pass


@click.command()
@config_option
@click.option("--host", default=None, help="Bind address (default from settings: 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default from settings: 8750).")
def serve(config: Path | None, host: str | None, port: int | None) -> None:
    """Start the gateway. With no settings at all: embedded engines, SQLite stores, demo tools."""
    import uvicorn

    from server.app import create_app
    from server.http_protocol import CoalescingProtocol
    from server.logs import configure_logging

    overrides: dict[str, object] = {}
    if host or port:
        base = settings_from(config).server
        overrides["server"] = base.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v})
    try:
        settings = load_settings(config, **overrides)
        configure_logging(settings.log_format, settings.log_level)
        app = create_app(settings, settle_heap=True)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if settings.demo and settings.auth.mode == "dev":
        with contextlib.suppress(OSError):  # a full disk under stderr must not stop the gateway
            click.echo(demo_banner(settings), err=True)
    with serving_file(settings):
        uvicorn.run(
            app,
            host=settings.server.host,
            port=settings.server.port,
            log_config=None,
            access_log=False,
            # SIGTERM: stop accepting, let running calls finish (and be audited) up to the grace period
            timeout_graceful_shutdown=int(settings.server.shutdown_grace()),
            limit_concurrency=2048,
            server_header=False,
            http=CoalescingProtocol,  # a response's head and body in one socket write (server/http_protocol.py)
        )


def demo_banner(settings: Settings) -> str:
    """What the demo prints first: the real endpoint, and how to get a token for it."""
    castellan = "castellan" if not Path(".venv/bin/castellan").exists() else ".venv/bin/castellan"
    return "\n".join(
        [
            f"Castellan demo: MCP endpoint {settings.resource_url}",
            *(
                [f"  sign in with any OAuth MCP client: dev issuer {settings.issuer} (demo identities, dev only)"]
                if settings.auth.dev_issuer
                else []
            ),
            f"  token for an analyst:   {castellan} token --agent demo-agent --groups analysts",
            f"  token for an admin:     {castellan} token --agent ops-agent --groups admins",
            "  (run them from this directory, with the same CASTELLAN_* settings; they find this gateway's"
            f" URL in {settings.data_dir / SERVING_FILE})",
        ]
    )


@contextlib.contextmanager
def serving_file(settings: Settings) -> Iterator[None]:
    """`<data_dir>/serving.json` names the URL this gateway serves while it runs, so `castellan token` in
    another terminal mints for the right audience even when the port was given on the command line.
    (Uvicorn re-raises SIGTERM after its graceful shutdown, so the file can outlive the process: readers
    check that its pid is alive.)"""
    path = settings.data_dir / SERVING_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    serving = {"pid": os.getpid(), "resource": settings.resource_url, "audience": settings.audience}
    path.write_text(json.dumps({**serving, "issuer": settings.issuer}))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


@click.command("demo-data")
@config_option
@click.option("--overwrite", is_flag=True, help="Recreate the tables even when they exist.")
def demo_data(config: Path | None, overwrite: bool) -> None:
    """Create the demo Delta tables (sales orders and customers, support documents)."""
    from tools.catalog_tools import table_catalog
    from tools.demo_data import create_demo_data

    tables = table_catalog(settings_from(config))
    created = create_demo_data(tables.root, overwrite=overwrite)
    click.echo(f"{len(created)} tables created under {tables.root}: {', '.join(created) or '(all existed)'}")


@click.command()
@click.argument("url")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file holding the bearer token, re-read when it changes (default: $CASTELLAN_TOKEN).")  # fmt: skip
@click.option("--sign-in", is_flag=True, help="Sign in with OAuth (browser once), then refresh the token by itself.")
@click.option("--token-store", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where --sign-in keeps its tokens (0600; default ~/.castellan/connect/<host>.json).")  # fmt: skip
@click.option(
    "--callback-port", type=int, default=33418, show_default=True, help="Loopback port of the sign-in redirect."
)
def connect(url: str, token_file: Path | None, sign_in: bool, token_store: Path | None, callback_port: int) -> None:
    """Bridge stdio to the gateway at URL, for MCP clients that only speak stdio (desktop agents).

    The token comes from --sign-in (OAuth, refreshed by the bridge), --token-file (re-read when it changes)
    or $CASTELLAN_TOKEN; logs go to stderr, stdout is the protocol."""
    from urllib.parse import urlsplit

    import anyio

    from server.connect import FileBearer, bridge, sign_in_auth

    auth: Any
    if sign_in:
        host = urlsplit(url).netloc.replace(":", "_") or "gateway"
        store = token_store or Path.home() / ".castellan" / "connect" / f"{host}.json"
        auth = sign_in_auth(url, store, callback_port)
    elif token_file:
        auth = FileBearer(token_file)
    else:
        auth = os.environ.get("CASTELLAN_TOKEN", "").strip()
        if not auth:
            raise click.ClickException("no token: pass --sign-in or --token-file, or set CASTELLAN_TOKEN")
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(bridge, url, auth)


@click.command()
@config_option
def ship(config: Path | None) -> None:
    """Ship the audit outbox to MLflow until stopped (SIGTERM/SIGINT). The gateway runs this as a
    supervised child process; run it yourself to ship from a host where no gateway runs. Only one
    shipper may run per outbox: a second one exits (status 3) naming the first."""
    import asyncio
    import signal

    from server.audit.keys import KEY_ENV, ChainKey, chain_key_for
    from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
    from server.audit.outbox import SqliteOutbox
    from server.audit.ship_process import BUSY_EXIT, SETTINGS_ENV
    from server.audit.shipper import Shipper, ShipperBusy
    from server.logs import configure_logging
    from server.metrics import Metrics
    from server.settings import AuditSettings

    given = os.environ.get(SETTINGS_ENV)
    try:
        if given:  # from the supervising gateway
            document = json.loads(given)
            audit, data_dir, audit_db = (
                AuditSettings(**document["audit"]),
                Path(document["data_dir"]),
                Path(document["audit_db"]),
            )
            key = ChainKey.from_text(os.environ.get(KEY_ENV, ""), KEY_ENV)
            configure_logging("json", "info")
        else:
            settings = settings_from(config)
            audit, data_dir = settings.audit, settings.data_dir
            audit_db = settings.data_file(audit.path, "audit.db")
            key = chain_key_for(settings)
            configure_logging(settings.log_format, settings.log_level)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    uri = audit.mlflow_tracking_uri or local_tracking_uri(data_dir)
    outbox = SqliteOutbox(audit_db, key=key, checkpoints=audit.checkpoint_path)
    shipper = Shipper(outbox, MlflowTarget(uri, audit.mlflow_experiment), audit, Metrics(),
                      status_file=data_dir / "shipper-status.json")  # fmt: skip
    try:
        shipper.lock.acquire()
    except ShipperBusy as exc:
        click.echo(f"castellan ship: {exc}", err=True)
        raise SystemExit(BUSY_EXIT) from None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        shipper.start()
        await stop.wait()
        await shipper.stop(drain_seconds=5.0)
        await outbox.close()

    asyncio.run(run())
