"""`castellan tools`: list tools, show and approve upstream definitions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.cli._common import config_option, settings_from

if TYPE_CHECKING:
    pass


@click.group()
def tools() -> None:
    """Upstream tool pins (quarantine and approval) and the demo data."""


@tools.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
def tools_list(config: Path | None, as_json: bool) -> None:
    """Every upstream tool seen, with its pin status (approved or quarantined)."""
    from server.upstream.pins import PinStore

    store = PinStore(settings_from(config).data_dir / "upstream_pins.db")
    pins = store.list()
    store.close()
    if as_json:
        click.echo(json.dumps([_pin_dict(p) for p in pins], indent=2))
        return
    for pin in pins:
        click.echo(f"{pin.tool:40}  {pin.status:11}  {pin.seen_hash[:12]}  approved by {pin.approved_by or '-'}")


def _pin_dict(pin: Any) -> dict[str, Any]:
    return {name: getattr(pin, name) for name in pin.__slots__}


@tools.command("approve")
@config_option
@click.argument("names", nargs=-1, required=True)
@click.option("--by", default=lambda: os.environ.get("USER", "admin"), help="Who approves (recorded).")
def tools_approve(config: Path | None, names: tuple[str, ...], by: str) -> None:
    """Approve the current definition of upstream tools NAMES (e.g. files.read_file): served again
    at the gateway's next upstream refresh."""
    from server.upstream.pins import PinStore

    store = PinStore(settings_from(config).data_dir / "upstream_pins.db")
    try:
        for name in names:
            try:
                pin = store.approve(name, by)
            except KeyError:
                raise click.ClickException(f"no upstream tool {name} has been seen") from None
            click.echo(f"approved {pin.tool} (definition {pin.seen_hash[:12]}) by {by}")
    finally:
        store.close()


@tools.command("show")
@config_option
@click.argument("name")
def tools_show(config: Path | None, name: str) -> None:
    """The definition an upstream tool offers now, and whether it is the approved one."""
    from server.upstream.pins import PinStore

    store = PinStore(settings_from(config).data_dir / "upstream_pins.db")
    found = [p for p in store.list() if p.tool == name]
    store.close()
    if not found:
        raise click.ClickException(f"no upstream tool {name} has been seen")
    click.echo(json.dumps(_pin_dict(found[0]), indent=2))
