"""`castellan usage`: an agent's metered usage against its limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from server.cli._common import config_option, settings_from
from server.errors import CastellanError, ConfigError

if TYPE_CHECKING:
    pass


@click.command()
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

    settings = settings_from(config)
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
