"""`castellan grants`: administer the local catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from server.cli._common import admin_action, config_option, settings_from
from server.grants.source import SECURABLE_TYPES

if TYPE_CHECKING:
    from server.grants.local import LocalCatalog


def _catalog(config: Path | None) -> LocalCatalog:
    from server.grants.local import LocalCatalog

    settings = settings_from(config)
    if settings.grants.backend != "local":
        raise click.ClickException("castellan grants manages the local catalog; for Databricks use its own tools")
    return LocalCatalog(settings.data_file(settings.grants.path, "catalog.db"))


@click.group()
def grants() -> None:
    """Manage the local catalog: grants, securables, owners, principals, group membership.

    Changes reach a running gateway within its grants cache TTL (grants.cache_ttl_seconds)."""


_KINDS = click.Choice(["user", "service_principal", "group"])


@grants.command("grant", context_settings={"ignore_unknown_options": True})
@config_option
@click.option("--kind", type=_KINDS, default=None, help="Register PRINCIPAL with this kind if it is new.")
@click.argument("statement", nargs=-1, required=True)
def grants_grant(config: Path | None, kind: str | None, statement: tuple[str, ...]) -> None:
    """PRIVILEGE[, PRIVILEGE] ON TYPE NAME TO PRINCIPAL, e.g. EXECUTE ON FUNCTION main.tools.sql TO analysts.

    PRINCIPAL must be a registered user, service principal or group (`principal add`, or --kind)."""
    from server.grants import admin

    catalog = _catalog(config)
    admin_action(lambda: admin.grant(catalog, admin.parse(statement, "TO"), kind))


@grants.command("revoke", context_settings={"ignore_unknown_options": True})
@config_option
@click.argument("statement", nargs=-1, required=True)
def grants_revoke(config: Path | None, statement: tuple[str, ...]) -> None:
    """PRIVILEGE[, PRIVILEGE] ON TYPE NAME FROM PRINCIPAL."""
    from server.grants import admin

    catalog = _catalog(config)
    admin_action(lambda: admin.revoke(catalog, admin.parse(statement, "FROM")))


@grants.command("show")
@config_option
@click.option("--principal", default=None, help="Grants made to this principal.")
@click.option("--securable", default=None, help="Grants made on this securable.")
@click.option("--effective", is_flag=True, help="With both: what the principal holds there, and from where.")
@click.option("--kind", type=_KINDS, default=None, help="With --effective: the principal's kind (default: its own).")
def grants_show(
    config: Path | None, principal: str | None, securable: str | None, effective: bool, kind: str | None
) -> None:
    """List grants (direct by default; --effective adds inheritance, groups and ownership)."""
    from server.identity import Principal

    catalog = _catalog(config)
    if effective:
        if not (principal and securable):
            raise click.ClickException("--effective needs --principal and --securable")
        registered = catalog.kind_of(principal)
        if registered is None and kind is None:
            raise click.ClickException(f"no principal {principal!r}: give --kind, or register it (principal add)")
        # What a caller of that kind and name holds: a service principal called like a group holds nothing of it.
        typed = Principal(kind or registered, principal)  # type: ignore[arg-type]
        click.echo(f"# as {typed}", err=True)
        for held in catalog.effective_detail([typed], securable):
            source = (
                f"inherited from {held.inherited_from_type} {held.inherited_from}" if held.inherited_from else "direct"
            )
            click.echo(f"{held.privilege}\t{securable}\t{source}")
        return
    for grant in catalog.grants(principal=principal, securable=securable):
        click.echo(f"{grant.principal}\t{grant.privilege}\t{grant.securable}\t{_kind_label(catalog, grant.principal)}")


@grants.command("securable")
@config_option
@click.argument("action", type=click.Choice(["add"]))
@click.argument("securable_type", type=click.Choice(list(SECURABLE_TYPES), case_sensitive=False))
@click.argument("name")
@click.option("--owner", default=None)
def grants_securable(config: Path | None, action: str, securable_type: str, name: str, owner: str | None) -> None:
    """add TYPE NAME [--owner P]: create a securable (and missing parents)."""
    catalog = _catalog(config)
    admin_action(lambda: catalog.add_securable(securable_type, name, owner), f"CREATE {securable_type.upper()} {name}")


@grants.command("owner")
@config_option
@click.argument("securable_type", type=click.Choice(list(SECURABLE_TYPES), case_sensitive=False))
@click.argument("name")
@click.argument("to", type=click.Choice(["TO", "to"]))
@click.argument("principal")
def grants_owner(config: Path | None, securable_type: str, name: str, to: str, principal: str) -> None:
    """TYPE NAME TO PRINCIPAL: make PRINCIPAL the owner (all privileges on that object)."""
    catalog = _catalog(config)
    admin_action(
        lambda: catalog.set_owner(name, principal), f"ALTER {securable_type.upper()} {name} OWNER TO {principal}"
    )


def _kind_label(catalog: LocalCatalog, name: str) -> str:
    kind = catalog.kind_of(name)
    return kind.replace("_", " ") if kind else "unregistered: holds nothing"


@grants.command("principal")
@config_option
@click.argument("action", type=click.Choice(["add", "list"]))
@click.argument("name", required=False)
@click.option("--kind", type=_KINDS, default=None)
def grants_principal(config: Path | None, action: str, name: str | None, kind: str | None) -> None:
    """add NAME --kind user|group|service_principal; list (with names grants refer to that are not registered).

    A name has one kind: a token's agent or subject never receives a group's grants, nor a group a user's."""
    catalog = _catalog(config)
    if action == "list":
        for entry in catalog.export()["principals"]:
            click.echo(f"{entry['name']}\t{entry['kind']}")
        for stray in catalog.unregistered():
            click.echo(f"{stray}\tunregistered: holds nothing until added with --kind")
        return
    if not name or not kind:
        raise click.ClickException("principal add needs NAME and --kind user|service_principal|group")
    admin_action(lambda: catalog.add_principal(name, kind), f"principal {name} ({kind})")


@grants.command("member")
@config_option
@click.argument("action", type=click.Choice(["add", "remove"]))
@click.argument("member")
@click.argument("preposition", type=click.Choice(["TO", "FROM", "to", "from"]))
@click.argument("group")
def grants_member(config: Path | None, action: str, member: str, preposition: str, group: str) -> None:
    """add MEMBER TO GROUP | remove MEMBER FROM GROUP (groups may contain groups)."""
    catalog = _catalog(config)
    if action == "add":
        admin_action(lambda: catalog.add_member(member, group), f"{member} is now in {group}")
    else:
        removed = catalog.remove_member(member, group)
        click.echo(f"{member} removed from {group}" if removed else "(not a member)")


@grants.command("export")
@config_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False), required=False)
def grants_export(config: Path | None, file: Path | None) -> None:
    """Write the whole catalog as JSON (to FILE or stdout), deterministic for review in a pull request."""
    catalog = _catalog(config)
    text = catalog.dumps(catalog.export())
    if file is None:
        click.echo(text, nl=False)
    else:
        file.write_text(text)


@grants.command("import")
@config_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def grants_import(config: Path | None, file: Path) -> None:
    """Make the catalog exactly FILE (an export), in one transaction: invalid means nothing changes."""
    catalog = _catalog(config)
    try:
        document = json.loads(file.read_text())
    except ValueError as exc:
        raise click.ClickException(f"{file} is not JSON: {exc}") from None
    admin_action(lambda: catalog.replace_all(document), f"imported {sum(len(v) for v in document.values())} entries")
