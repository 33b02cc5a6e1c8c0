"""`castellan credentials list|revoke`: the brokered per-user upstream grants (never their tokens)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from server.cli._common import config_option, settings_from
from server.credentials.store import GrantStore


def _store(config: Path | None) -> GrantStore:
    from server.credentials.sealing import Sealer
    from server.errors import ConfigError

    settings = settings_from(config)
    try:
        return GrantStore(
            settings.data_file(settings.credentials.path, "credentials.db"), Sealer.from_settings(settings)
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def credentials() -> None:
    """Brokered upstream grants: who authorized which upstream."""


@credentials.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def list_grants(config: Path | None, as_json: bool) -> None:
    """Every brokered grant: upstream, user, scope, when it was made and last refreshed."""
    rows = _store(config).summaries()
    if as_json:
        click.echo(json.dumps([_row(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no brokered grants")
    for r in rows:
        state = "refreshable" if r.refreshable else "no refresh token"
        click.echo(
            f"{r.upstream}\t{r.subject}\tscope={r.scope or '-'}\tgranted {_when(r.created_at)}\t"
            f"refreshed {_when(r.refreshed_at)}\t{state}"
        )


@credentials.command("revoke")
@config_option
@click.option("--subject", required=True, help="The user whose grant is revoked.")
@click.option("--upstream", default=None, help="Only this upstream's grant (default: all of the user's).")
def revoke(config: Path | None, subject: str, upstream: str | None) -> None:
    """Delete a user's brokered grant: their next call to the upstream is refused with a new link."""
    removed = _store(config).revoke(upstream, subject)
    if not removed:
        raise click.ClickException(f"no brokered grant for {subject}" + (f" at {upstream}" if upstream else ""))
    click.echo(f"revoked {removed} grant(s) of {subject}")


def _row(r: object) -> dict[str, object]:
    return {name: getattr(r, name) for name in getattr(r, "__slots__", ())}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
