"""What every `castellan` command shares: the --config option, settings loading, admin actions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from server.errors import ConfigError
from server.settings import Settings, load_settings


def settings_from(config: Path | None) -> Settings:
    """The settings for `--config` (or the default places); a `ConfigError` becomes a clean CLI error."""
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


def admin_action(action: Callable[[], object], message: str | None = None) -> None:
    """Run an admin action; a `ConfigError` becomes a clean CLI error. Prints the lines it returns,
    or `message`."""
    try:
        result = action()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    lines = result if isinstance(result, list) else [message] if message else []
    for line in lines:
        click.echo(line)
