"""`castellan check-config`: build every backend from the settings, reach each one, print a verdict."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from server.cli._common import config_option, settings_from


@click.command("check-config")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document: warnings, checks, verdict.")
def check_config(config: Path | None, as_json: bool) -> None:
    """Build every backend and reach it (issuer keys, policy engine, grants, meter, audit outbox, MLflow,
    each upstream). Prints warnings first and a one-line verdict last; exits 1 on any failed check."""
    from server.preflight import preflight

    report = asyncio.run(preflight(settings_from(config)))
    if as_json:
        click.echo(json.dumps(report.document(), indent=2))
    else:
        for warning in report.warnings:
            click.echo(f"warning: {warning}")
        for check in report.checks:
            click.echo(f"{'ok    ' if check.ok else 'FAILED'}  {check.name}: {check.detail}")
        click.echo(report.verdict())
    sys.exit(0 if report.ok else 1)
