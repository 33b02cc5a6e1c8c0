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
    """Every upstream tool seen, with its pin status (approved or quarantined), and every upstream
    tool refused (a colliding name or securable, an unsafe input schema), with the reason."""
    from server.upstream.pins import PinStore

    store = PinStore(settings_from(config).data_dir / "upstream_pins.db")
    pins, refusals = store.list(), store.refusals()
    store.close()
    if as_json:
        click.echo(json.dumps([_as_dict(p) for p in pins] + [_refusal_dict(r) for r in refusals], indent=2))
        return
    refused = {r.tool for r in refusals if r.kind == "schema"}
    for pin in pins:
        if pin.tool not in refused:
            click.echo(f"{pin.tool:40}  {pin.status:11}  {pin.seen_hash[:12]}  approved by {pin.approved_by or '-'}")
    for refusal in refusals:
        click.echo(f"{refusal.tool:40}  {'refused':11}  from {refusal.upstream}: {refusal.reason}")


def _as_dict(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}


def _refusal_dict(refusal: Any) -> dict[str, Any]:
    return {**_as_dict(refusal), "status": "refused"}


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
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
            click.echo(f"approved {pin.tool} (definition {pin.seen_hash[:12]}) by {by}")
    finally:
        store.close()


@tools.command("show")
@config_option
@click.argument("name")
def tools_show(config: Path | None, name: str) -> None:
    """The definition an upstream tool offers now, whether it is the approved one, and any refusal
    under that name (with the reason, naming both sides of a collision)."""
    from server.upstream.pins import PinStore

    store = PinStore(settings_from(config).data_dir / "upstream_pins.db")
    found: list[dict[str, Any]] = [_as_dict(p) for p in store.list() if p.tool == name]
    found += [_refusal_dict(r) for r in store.refusals() if r.tool == name]
    store.close()
    if not found:
        raise click.ClickException(f"no upstream tool {name} has been seen")
    click.echo(json.dumps(found[0] if len(found) == 1 else found, indent=2))
