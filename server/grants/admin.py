"""Grant administration in the spirit of SQL: `GRANT p[, p] ON TYPE name TO principal`, `REVOKE ... FROM`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.errors import ConfigError
from server.grants.local import LocalCatalog
from server.grants.source import SECURABLE_TYPES, normalize_privilege


@dataclass(frozen=True, slots=True)
class GrantStatement:
    privileges: tuple[str, ...]
    securable_type: str
    securable: str
    principal: str


def parse(words: Sequence[str], preposition: str) -> GrantStatement:
    """`["USE", "CATALOG,", "USE", "SCHEMA", "ON", "CATALOG", "main", "TO", "analysts"]` (preposition
    `TO` for grant, `FROM` for revoke). Principals may have spaces (`account users`)."""
    upper = [w.upper() for w in words]
    usage = f"expected: PRIVILEGE[, PRIVILEGE] ON {'|'.join(SECURABLE_TYPES)} NAME {preposition} PRINCIPAL"
    if "ON" not in upper or preposition not in upper:
        raise ConfigError(usage)
    on, to = upper.index("ON"), len(upper) - 1 - upper[::-1].index(preposition)
    if to != on + 3:
        raise ConfigError(usage)
    privileges = tuple(normalize_privilege(p) for p in " ".join(words[:on]).split(",") if p.strip())
    principal = " ".join(words[to + 1 :]).strip()
    securable_type = upper[on + 1]
    if not privileges or not principal or securable_type not in SECURABLE_TYPES:
        raise ConfigError(usage)
    return GrantStatement(privileges, securable_type, words[on + 2], principal)


def grant(catalog: LocalCatalog, statement: GrantStatement, kind: str | None = None) -> list[str]:
    """Apply a GRANT; the securable must exist with the named type, and the principal must be
    registered (with `kind`, it is registered first, or must already be of that kind). Returns
    what was granted."""
    _check_type(catalog, statement)
    if kind is not None:
        catalog.add_principal(statement.principal, kind)
    catalog.grant_many([(statement.principal, p, statement.securable) for p in statement.privileges])
    return [
        f"GRANT {p} ON {statement.securable_type} {statement.securable} TO {statement.principal}"
        for p in statement.privileges
    ]


def revoke(catalog: LocalCatalog, statement: GrantStatement) -> list[str]:
    _check_type(catalog, statement)
    done = []
    for privilege in statement.privileges:
        removed = catalog.revoke(privilege, statement.securable, statement.principal)
        verb = "REVOKE" if removed else "(not granted)"
        done.append(
            f"{verb} {privilege} ON {statement.securable_type} {statement.securable} FROM {statement.principal}"
        )
    return done


def _check_type(catalog: LocalCatalog, statement: GrantStatement) -> None:
    actual = catalog.securable_type(statement.securable)
    if actual is None:
        raise ConfigError(
            f"no securable {statement.securable!r}: create it with "
            f"`castellan grants securable add {statement.securable_type} {statement.securable}`"
        )
    if actual != statement.securable_type:
        raise ConfigError(f"{statement.securable} is a {actual}, not a {statement.securable_type}")
