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
    """Every tool with its securable and the privileges a caller needs: the built-in and catalog-function
    tools this configuration serves, every upstream tool seen with its pin status (approved or
    quarantined), and every upstream tool refused (a colliding name or securable, an unsafe schema)."""
    from server.upstream.pins import PinStore

    settings = settings_from(config)
    served = _served_tools(settings)
    store = PinStore(settings.data_dir / "upstream_pins.db")
    pins, refusals = store.list(), store.refusals()
    store.close()
    upstreams = {u.name: u for u in settings.upstreams}
    if as_json:
        pinned = [{**_as_dict(p), **_grants_of(_upstream_securable(upstreams, p))} for p in pins]
        click.echo(json.dumps(served + pinned + [_refusal_dict(r) for r in refusals], indent=2))
        return
    for tool in served:
        click.echo(f"{tool['tool']:40}  {tool['status']:11}  {tool['securable']}  needs {', '.join(tool['needs'])}")
    refused = {r.tool for r in refusals if r.kind == "schema"}
    for pin in pins:
        if pin.tool not in refused:
            needs = _grants_of(_upstream_securable(upstreams, pin))
            click.echo(
                f"{pin.tool:40}  {pin.status:11}  {pin.seen_hash[:12]}  approved by {pin.approved_by or '-'}"
                + (f"  {needs['securable']}  needs {', '.join(needs['needs'])}" if needs else "")
            )
    for refusal in refusals:
        click.echo(f"{refusal.tool:40}  {'refused':11}  from {refusal.upstream}: {refusal.reason}")


def _grants_of(securable: str | None) -> dict[str, Any]:
    """The securable and what calling it needs (USE CATALOG, USE SCHEMA, EXECUTE), as the grants stage asks."""
    from server.grants.source import function_requirements

    if not securable:
        return {}
    return {"securable": securable, "needs": [str(r) for r in function_requirements(securable)]}


def _upstream_securable(upstreams: dict[str, Any], pin: Any) -> str | None:
    from server.upstream.tool import securable_of

    configured = upstreams.get(pin.upstream)
    name = pin.definition.get("name") if isinstance(pin.definition, dict) else None
    return securable_of(configured, name) if configured is not None and isinstance(name, str) else None


def _served_tools(settings: Any) -> list[dict[str, Any]]:
    """The tools this configuration serves itself (built-in, catalog functions), without starting anything
    that runs a tool; with what each needs (the SQL tool also SELECT on each table a query reads)."""
    from tools.catalog_tools import configured_tools

    tools, closers = configured_tools(settings)
    try:
        rows = []
        for tool in tools:
            spec = tool.spec
            row = {"tool": spec.name, "status": "served", "source": "function" if spec.name.count(".") >= 2
                   else "built-in", **_grants_of(spec.securable)}  # fmt: skip
            derived = getattr(tool, "required_grants", None)
            if derived is not None:  # fixed by the tool (a search index's table), or read from the arguments
                try:
                    extra = [str(r) for r in derived({}) if str(r) not in row["needs"]]
                except Exception:
                    extra = []
                row["needs"] = (
                    [*row["needs"], *extra]
                    if extra
                    else [*row["needs"], "SELECT on each table the query reads (with USE CATALOG, USE SCHEMA)"]
                )
            rows.append(row)
        return rows
    finally:
        for close in closers:
            close()


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
