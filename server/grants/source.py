"""The grant source contract and the privileges a tool call needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

ALL_PRIVILEGES = "ALL PRIVILEGES"


@dataclass(frozen=True, slots=True)
class Requirement:
    """One privilege on one securable, e.g. `EXECUTE on main.tools.echo`."""

    privilege: str
    securable: str

    def __str__(self) -> str:
        return f"{self.privilege} on {self.securable}"


def function_requirements(securable: str) -> tuple[Requirement, ...]:
    """What calling the catalog function `securable` needs: USE CATALOG, USE SCHEMA, then EXECUTE."""
    catalog, schema, _ = securable.split(".", 2)
    return (
        Requirement("USE CATALOG", catalog),
        Requirement("USE SCHEMA", f"{catalog}.{schema}"),
        Requirement("EXECUTE", securable),
    )


class GrantSource(Protocol):
    """Effective privileges: what `principals` hold on `securable`, inherited ones included.

    Raises `BackendUnavailable` when it cannot answer; never guesses.
    """

    async def privileges(self, principals: Sequence[str], securable: str) -> frozenset[str]: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...
