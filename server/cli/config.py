"""`castellan check-config`: load and validate the settings."""

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


@click.command("check-config")
@config_option
def check_config(config: Path | None) -> None:
    """Validate the settings and build every backend; print the resolved settings."""
    import asyncio

    from server.gateway import build_gateway

    settings = settings_from(config)
    try:
        gateway = build_gateway(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    checks = asyncio.run(gateway.readiness())
    asyncio.run(gateway.close())
    from server.sandbox import detect_mode

    mode = detect_mode(settings.tools.sandbox)  # how tool code is isolated here (the weaker mode says why)
    sandbox = {"mode": mode.name, "isolated": mode.isolated, "detail": mode.describe()}
    output = {"settings": json.loads(settings.model_dump_json()), "checks": checks, "sandbox": sandbox}
    click.echo(json.dumps(output, indent=2))
    if any(v != "ok" for v in checks.values()):
        sys.exit(1)
