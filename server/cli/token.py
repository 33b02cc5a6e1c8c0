"""`castellan token`: mint a dev token signed with the local key."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from server.cli._common import config_option, settings_from

if TYPE_CHECKING:
    pass


@click.command()
@config_option
@click.option("--agent", required=True, help="Agent id (the metering and audit key).")
@click.option("--groups", default="", help="Comma-separated groups, e.g. analysts,admins.")
@click.option("--scopes", default="", help="Comma-separated scopes.")
@click.option("--subject", default=None, help="The human or service the agent acts for (default: the agent).")
@click.option("--ttl", type=int, default=None, help="Lifetime in seconds (default from settings: 3600).")
def token(config: Path | None, agent: str, groups: str, scopes: str, subject: str | None, ttl: int | None) -> None:
    """Mint a short-lived dev token for this gateway (dev mode only)."""
    from server.auth.devkeys import mint_dev_token

    settings = settings_from(config)
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
