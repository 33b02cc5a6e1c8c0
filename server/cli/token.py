"""`castellan token`: mint a dev token signed with the local key (the dev issuer's), for the running gateway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from server.cli._common import config_option, settings_from
from server.settings import SERVING_FILE, Settings


def _running(settings: Settings, what: str) -> str | None:
    """`audience` or `issuer` of the gateway serving from this data directory, if one is running."""
    try:
        serving = json.loads((settings.data_dir / SERVING_FILE).read_text())
        os.kill(int(serving["pid"]), 0)
        return str(serving[what])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _issuer_of_url(url: str) -> str:
    """The dev issuer of the gateway whose MCP URL is `url`: its base URL (the URL without `/mcp`)."""
    return url[: -len("/mcp")] if url.rstrip("/").endswith("/mcp") else url.rstrip("/")


@click.command()
@config_option
@click.option("--agent", required=True, help="Agent id (the metering and audit key).")
@click.option("--groups", default="", help="Comma-separated groups, e.g. analysts,admins.")
@click.option("--scopes", default="", help="Comma-separated scopes.")
@click.option("--subject", default=None, help="The human or service the agent acts for (default: the agent).")
@click.option("--ttl", type=int, default=None, help="Lifetime in seconds (default from settings: 3600).")
@click.option("--url", default=None, help="The gateway's MCP URL the token is for (default: the running gateway's).")
@click.option("--audience", default=None, help="The exact audience (default: --url, else the settings' resource).")
def token(
    config: Path | None,
    agent: str,
    groups: str,
    scopes: str,
    subject: str | None,
    ttl: int | None,
    url: str | None,
    audience: str | None,
) -> None:
    """Mint a short-lived dev token for this gateway (dev mode only).

    Reads the same settings as `castellan serve` (CASTELLAN_* variables, --config); the audience is the
    running gateway's URL when one serves from the same data directory."""
    from server.auth.devkeys import KEY_FILE, mint_dev_token

    settings = settings_from(config)
    if settings.auth.mode != "dev":
        raise click.ClickException("castellan token works in dev mode only (auth.mode = 'dev')")
    if not (settings.data_dir / KEY_FILE).is_file():
        raise click.ClickException(
            f"no dev signing key in {settings.data_dir.resolve()}: start the gateway first (./scripts/demo), "
            "and run this with the same CASTELLAN_DATA_DIR / --config as the gateway"
        )
    click.echo(
        mint_dev_token(
            settings.data_dir,
            agent=agent,
            issuer=settings.auth.issuer
            or (_issuer_of_url(url.rstrip("/")) if url else None)
            or _running(settings, "issuer")
            or settings.issuer,
            audience=audience or url or _running(settings, "audience") or settings.audience,
            groups=[g.strip() for g in groups.split(",") if g.strip()],
            scopes=[s.strip() for s in scopes.split(",") if s.strip()],
            subject=subject,
            ttl_seconds=ttl or settings.auth.dev_token_ttl_seconds,
        )
    )
