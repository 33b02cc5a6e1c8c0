"""`castellan audit`: search, show and verify the audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.cli._common import config_option, settings_from
from server.errors import ConfigError

if TYPE_CHECKING:
    from server.audit.checkpoints import Checkpoint
    from server.audit.outbox import SqliteOutbox


def _outbox(config: Path | None, *, verifying: bool = False) -> SqliteOutbox:
    from server.audit.keys import ChainKey, chain_key_for
    from server.audit.outbox import SqliteOutbox

    settings = settings_from(config)
    try:
        key = chain_key_for(settings, create=False)
    except ConfigError as exc:
        if verifying:
            raise click.ClickException(f"cannot verify without the chain key: {exc}") from None
        key = ChainKey.generate()  # reading needs no key
    return SqliteOutbox(settings.data_file(settings.audit.path, "audit.db"), key=key,
                        checkpoints=settings.audit.checkpoint_path)  # fmt: skip


def _expected_head(text: str) -> tuple[int, str]:
    seq, _, head = text.partition(":")
    if not seq.isdigit() or len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
        raise click.BadParameter(f"{text!r}: expected SEQ:HASH as `audit verify` prints it (64 hex digits)")
    return int(seq), head


@click.group()
def audit() -> None:
    """Search, show and verify the audit log (the local outbox; search also the MLflow traces)."""


@audit.command("verify")
@config_option
@click.option(
    "--expect-head", "expected", multiple=True, metavar="SEQ:HASH",
    help="A chain head you recorded elsewhere (as printed here); the chain must still reach it. Repeatable.",
)  # fmt: skip
@click.option("--mlflow", "use_mlflow", is_flag=True, help="Also check against the checkpoints shipped to MLflow.")
def audit_verify(config: Path | None, expected: tuple[str, ...], use_mlflow: bool) -> None:
    """Check the keyed hash chain against its signed checkpoints: any edited, deleted, reordered,
    renumbered or rewritten-and-rehashed record, and a cut-off tail, is reported with its position."""
    heads = [_expected_head(text) for text in expected]
    outbox = _outbox(config, verifying=True)
    extra: list[Checkpoint] = []
    if use_mlflow:
        from server.audit.mlflow_target import MlflowTarget, local_tracking_uri

        settings = settings_from(config)
        uri = settings.audit.mlflow_tracking_uri or local_tracking_uri(settings.data_dir)
        try:
            extra = MlflowTarget(uri, settings.audit.mlflow_experiment).read_checkpoints()
        except Exception as exc:
            raise click.ClickException(f"cannot read checkpoints from MLflow: {type(exc).__name__}: {exc}") from None
    result = outbox.verify(heads, extra)
    for problem in result.breaks[:200]:
        click.echo(f"record {problem.seq}: {problem.problem}", err=True)
    if len(result.breaks) > 200:
        click.echo(f"… and {len(result.breaks) - 200} more", err=True)
    if result.interrupted:
        more = " …" if len(result.interrupted) > 10 else ""
        click.echo(
            f"{len(result.interrupted)} call(s) interrupted by a crash (closed at the next start): "
            + ", ".join(result.interrupted[:10]) + more,
            err=True,
        )  # fmt: skip
    if result.unfinished:
        click.echo(f"{len(result.unfinished)} allowed call(s) without an outcome yet (running, or cut off)", err=True)
    checked = f"{result.checkpoints} checkpoint(s)" + (f", {len(extra)} from MLflow" if use_mlflow else "")
    if result.unkeyed:
        checked += f"; {result.unkeyed} record(s) from before the chain key (SHA-256 only)"
    click.echo(
        f"{result.records} records, chain head {result.last_seq}:{result.head} ({checked}): "
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
@click.option(
    "--outcome", type=click.Choice(["ok", "error", "interrupted", "unfinished"]),
    help="What became of the call: interrupted = cut off by a crash, closed at the next start.",
)  # fmt: skip
@click.option("--since", help="ISO 8601 time (inclusive).")
@click.option("--until", help="ISO 8601 time (exclusive).")
@click.option(
    "--shadow-diff", "shadow_diff", is_flag=True,
    help="Only calls the shadow policy (policy.shadow_path) would have decided otherwise.",
)  # fmt: skip
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
    if query.shadow_diff and source == "mlflow":
        raise click.ClickException("--shadow-diff searches the outbox (the shadow verdict is in its records)")
    try:
        if source == "mlflow":
            from server.audit.mlflow_target import MlflowTarget, local_tracking_uri

            settings = settings_from(config)
            uri = settings.audit.mlflow_tracking_uri or local_tracking_uri(settings.data_dir)
            if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
                raise click.ClickException(f"no MLflow store at {uri} yet: the gateway has not shipped anything")
            from server.audit.mlflow_search import search_store

            local = (
                search_store(Path(uri.removeprefix("sqlite:///")), settings.audit.mlflow_experiment, query)
                if (uri.startswith("sqlite:///"))
                else None
            )  # a local store is read from its tables: no MLflow import (seconds) before the answer
            results = local if local is not None else MlflowTarget(uri, settings.audit.mlflow_experiment).search(query)
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
    from server.audit.redaction import Redactor  # exports redact too: records kept from before a detector existed

    results = Redactor.from_settings(settings_from(config).audit).apply(results)
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
