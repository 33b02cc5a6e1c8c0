"""`castellan audit`: search, show and verify the audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.cli._common import config_option, settings_from

if TYPE_CHECKING:
    from server.audit.outbox import SqliteOutbox


def _outbox(config: Path | None) -> SqliteOutbox:
    from server.audit.outbox import SqliteOutbox

    settings = settings_from(config)
    return SqliteOutbox(settings.data_file(settings.audit.path, "audit.db"))


@click.group()
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

            settings = settings_from(config)
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
