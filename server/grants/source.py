"""The grant source contract, Unity Catalog's privilege vocabulary, and what a tool call requires."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.identity import ACCOUNT_USERS as ACCOUNT_USERS
from server.identity import Principal

ALL_PRIVILEGES = "ALL PRIVILEGES"
SECURABLE_TYPES = ("CATALOG", "SCHEMA", "FUNCTION", "TABLE", "RESOURCE")

# Which privileges apply to which securable type (a subset of Unity Catalog's reference: the ones a
# gateway checks). A privilege granted on a container is inherited by the objects below it.
APPLICABLE: dict[str, frozenset[str]] = {
    "CATALOG": frozenset(
        {
            ALL_PRIVILEGES,
            "USE CATALOG",
            "USE SCHEMA",
            "EXECUTE",
            "SELECT",
            "READ",
            "MODIFY",
            "BROWSE",
            "CREATE SCHEMA",
            "CREATE TABLE",
            "CREATE FUNCTION",
            "MANAGE",
        }
    ),
    "SCHEMA": frozenset(
        {
            ALL_PRIVILEGES,
            "USE SCHEMA",
            "EXECUTE",
            "SELECT",
            "READ",
            "MODIFY",
            "BROWSE",
            "CREATE TABLE",
            "CREATE FUNCTION",
            "MANAGE",
        }
    ),
    "FUNCTION": frozenset({ALL_PRIVILEGES, "EXECUTE", "MANAGE"}),
    "TABLE": frozenset({ALL_PRIVILEGES, "SELECT", "MODIFY", "MANAGE"}),
    # A resource an MCP server (upstream, or the gateway itself) serves: reading it needs READ.
    "RESOURCE": frozenset({ALL_PRIVILEGES, "READ", "MANAGE"}),
}
# What ALL PRIVILEGES stands for (Unity Catalog excludes MANAGE from it).
ALL_EXPANDS_TO = frozenset().union(*APPLICABLE.values()) - {ALL_PRIVILEGES, "MANAGE"}


def normalize_privilege(privilege: str) -> str:
    """`use_catalog`, `USE_CATALOG` and `use catalog` are all `USE CATALOG` (REST uses underscores)."""
    return " ".join(privilege.replace("_", " ").upper().split())


@dataclass(frozen=True, slots=True)
class Requirement:
    """One privilege on one securable, e.g. `EXECUTE on main.tools.echo` (a FUNCTION)."""

    privilege: str
    securable_type: str
    securable: str

    def __str__(self) -> str:
        return f"{self.privilege} on {self.securable}"


def function_requirements(securable: str) -> tuple[Requirement, ...]:
    """Calling the catalog function `securable` needs USE CATALOG, USE SCHEMA, then EXECUTE."""
    catalog, schema, _ = securable.split(".", 2)
    return (
        Requirement("USE CATALOG", "CATALOG", catalog),
        Requirement("USE SCHEMA", "SCHEMA", f"{catalog}.{schema}"),
        Requirement("EXECUTE", "FUNCTION", securable),
    )


def table_requirements(tables: Sequence[str]) -> tuple[Requirement, ...]:
    """Reading `tables` needs USE CATALOG and USE SCHEMA on their parents and SELECT on each."""
    needed: dict[Requirement, None] = {}
    for table in tables:
        catalog, schema, _ = table.split(".", 2)
        needed[Requirement("USE CATALOG", "CATALOG", catalog)] = None
        needed[Requirement("USE SCHEMA", "SCHEMA", f"{catalog}.{schema}")] = None
        needed[Requirement("SELECT", "TABLE", table)] = None
    return tuple(needed)


def holds(requirement: Requirement, privileges: frozenset[str]) -> bool:
    return requirement.privilege in privileges


class GrantSource(Protocol):
    """Effective privileges: what any of `principals` holds on the securable, counting privileges
    inherited from its parents, group membership (nested groups included) and ownership (all
    privileges on the owned object itself). `ALL PRIVILEGES` comes back expanded. Every caller is
    also in `account users`.

    Principals are typed: a principal counts only as the kind it is given with, so a service
    principal or user named like a group gets nothing of that group's, and a group named like a
    user nothing of that user's. A principal the source does not know with that kind holds nothing.

    Raises `BackendUnavailable` when it cannot answer; never guesses.
    """

    async def privileges(
        self, principals: Sequence[Principal], securable_type: str, securable: str
    ) -> frozenset[str]: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...
