"""The local catalog: securables, owners, principals, group membership and grants in SQLite, with
Unity Catalog's semantics."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import BackendUnavailable, ConfigError
from server.grants.source import (
    ACCOUNT_USERS,
    ALL_EXPANDS_TO,
    ALL_PRIVILEGES,
    APPLICABLE,
    SECURABLE_TYPES,
    normalize_privilege,
)
from server.identity import PRINCIPAL_KINDS, Principal
from server.sqlite import SqliteDatabase, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS securables (
  name TEXT PRIMARY KEY,
  type TEXT NOT NULL CHECK (type IN ('CATALOG', 'SCHEMA', 'FUNCTION', 'TABLE', 'RESOURCE')),
  owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS principals (
  name TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('user', 'group', 'service_principal'))
);
CREATE TABLE IF NOT EXISTS members (
  member TEXT NOT NULL,
  grp TEXT NOT NULL,
  PRIMARY KEY (member, grp)
);
CREATE TABLE IF NOT EXISTS grants (
  principal TEXT NOT NULL,
  privilege TEXT NOT NULL,
  securable TEXT NOT NULL,
  PRIMARY KEY (principal, privilege, securable)
);
CREATE INDEX IF NOT EXISTS grants_by_securable ON grants (securable);
"""
_TYPE_BY_DEPTH = {1: "CATALOG", 2: "SCHEMA"}


def _allow_resources(conn: sqlite3.Connection) -> None:
    """A catalog made before resources were securables: its table's CHECK refuses them (and `INSERT
    OR IGNORE` would drop them silently), so the table is rebuilt with the current definition."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'securables'").fetchone()
    if row is None or "'RESOURCE'" in row[0]:
        return
    create = _SCHEMA.split(";")[0].replace("IF NOT EXISTS securables", "securables_new")
    with transaction(conn):
        conn.execute(create)
        conn.execute("INSERT INTO securables_new (name, type, owner) SELECT name, type, owner FROM securables")
        conn.execute("DROP TABLE securables")
        conn.execute("ALTER TABLE securables_new RENAME TO securables")


def ancestors(securable: str) -> list[str]:
    """`main.tools.echo` → `["main", "main.tools", "main.tools.echo"]`."""
    parts = securable.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass(frozen=True, slots=True)
class Grant:
    principal: str
    privilege: str
    securable: str


@dataclass(frozen=True, slots=True)
class Inherited:
    """A privilege held on a securable and where it comes from (for `show` and the Databricks shape)."""

    privilege: str
    inherited_from: str | None
    inherited_from_type: str | None


class LocalCatalog:
    """Unity Catalog semantics, locally:

    - privileges granted on a catalog or schema are inherited by everything below it;
    - `ALL PRIVILEGES` stands for every applicable privilege (MANAGE excepted);
    - the owner of a securable holds all privileges on that securable only (not on its children);
    - a grant to a group applies to its members, through nested groups too; every principal is in
      the implicit group `account users`;
    - reaching an object also needs USE CATALOG and USE SCHEMA (the caller asks for those);
    - principals are typed: each name is registered once, as a user, a service principal or a group,
      and a caller's principal matches it only with that kind. Grants, memberships and ownership
      name registered principals only (as in Unity Catalog, where granting to an unknown principal
      fails); a name left from before registration was required holds nothing (`unregistered()`).
    """

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, schema=_SCHEMA)
        self._db.run_sync(_allow_resources)

    # -- the request path ----------------------------------------------------------------------

    async def privileges(self, principals: Sequence[Principal], securable_type: str, securable: str) -> frozenset[str]:
        try:
            return await self._db.run(lambda c: _effective(c, principals, securable))
        except sqlite3.Error as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {exc}") from exc

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM grants LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {exc}") from exc

    async def close(self) -> None:
        self._db.close()

    # -- administration (synchronous: the CLI and start-up) -------------------------------------

    def add_securable(self, securable_type: str, name: str, owner: str | None = None) -> None:
        """Create a securable (and its missing parents); an existing one keeps its owner unless given."""
        securable_type = securable_type.upper()
        if securable_type not in SECURABLE_TYPES:
            raise ConfigError(f"unknown securable type {securable_type!r}; choose from {list(SECURABLE_TYPES)}")
        depth = len(name.split("."))
        expected = _TYPE_BY_DEPTH.get(depth, "FUNCTION, TABLE or RESOURCE")
        if (depth <= 2 and securable_type != expected) or (depth == 3 and securable_type in _TYPE_BY_DEPTH.values()):
            raise ConfigError(f"{name!r} names a {expected}, not a {securable_type}")
        if depth > 3 or not all(name.split(".")):
            raise ConfigError(f"{name!r} is not catalog[.schema[.object]]")

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                for parent in ancestors(name)[:-1]:
                    conn.execute(
                        "INSERT OR IGNORE INTO securables (name, type) VALUES (?, ?)",
                        (parent, _TYPE_BY_DEPTH[len(parent.split("."))]),
                    )
                conn.execute("INSERT OR IGNORE INTO securables (name, type) VALUES (?, ?)", (name, securable_type))
                if owner is not None:
                    _check_principal(conn, owner, "an owner")
                    conn.execute("UPDATE securables SET owner = ? WHERE name = ?", (owner, name))

        self._db.run_sync(write)

    def set_owner(self, name: str, owner: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                _check_principal(conn, owner, "an owner")
                if conn.execute("UPDATE securables SET owner = ? WHERE name = ?", (owner, name)).rowcount == 0:
                    raise ConfigError(f"no securable {name!r}")

        self._db.run_sync(write)

    def add_principal(self, name: str, kind: str) -> None:
        """Register `name` as a principal of `kind`; registering it again with the same kind is harmless.
        A name has one kind: re-typing one (a group made a user) is refused, since its grants and
        memberships were made to the old kind."""
        if kind not in PRINCIPAL_KINDS:
            raise ConfigError(f"principal kind must be user, group or service_principal, not {kind!r}")
        if not name.strip() or name != name.strip():
            raise ConfigError(f"principal name {name!r} is empty or has surrounding spaces")
        if name == ACCOUNT_USERS:
            raise ConfigError(f"{ACCOUNT_USERS!r} is the implicit group of every principal; it cannot be added")

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                existing = _kind_of(conn, name)
                if existing is not None and existing != kind:
                    raise ConfigError(f"{name!r} is already a {_label(existing)}; a name has one kind")
                conn.execute("INSERT OR IGNORE INTO principals VALUES (?, ?)", (name, kind))

        self._db.run_sync(write)

    def kind_of(self, name: str) -> str | None:
        """The registered kind of `name` (`group` for `account users`), or None."""
        return self._db.run_sync(lambda c: _kind_of(c, name))

    def unregistered(self) -> list[str]:
        """Names that grants, memberships or owners refer to but that are not registered principals
        (from a catalog made before registration was required): they hold nothing until added."""
        return self._db.run_sync(
            lambda c: [
                r[0]
                for r in c.execute(
                    """SELECT principal FROM grants UNION SELECT member FROM members UNION SELECT grp FROM members
                       UNION SELECT owner FROM securables WHERE owner != '' EXCEPT SELECT name FROM principals
                       EXCEPT SELECT ? ORDER BY 1""",
                    (ACCOUNT_USERS,),
                )
            ]
        )

    def add_member(self, member: str, group: str) -> None:
        """Put the principal `member` (a user, service principal or group) in the group `group`."""
        if member == group:
            raise ConfigError("a group cannot be a member of itself")

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                _check_member(conn, member, group)
                conn.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (member, group))

        self._db.run_sync(write)

    def remove_member(self, member: str, group: str) -> int:
        return self._db.run_sync(
            lambda c: c.execute("DELETE FROM members WHERE member = ? AND grp = ?", (member, group)).rowcount
        )

    def grant(self, privilege: str, securable: str, principal: str) -> None:
        self.grant_many([(principal, privilege, securable)])

    def grant_many(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Grant (principal, privilege, securable) rows; granting twice is harmless. The securable must
        exist (or be created first) and the privilege must apply to its type."""
        items = [(p, normalize_privilege(priv), s) for p, priv, s in rows]

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                for principal, privilege, securable in items:
                    _check_applicable(conn, privilege, securable)
                    _check_principal(conn, principal, "a grantee", implicit=True)
                    conn.execute("INSERT OR IGNORE INTO grants VALUES (?, ?, ?)", (principal, privilege, securable))

        self._db.run_sync(write)

    def revoke(self, privilege: str, securable: str, principal: str) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(
                    "DELETE FROM grants WHERE principal = ? AND privilege = ? AND securable = ?",
                    (principal, normalize_privilege(privilege), securable),
                ).rowcount

        return self._db.run_sync(write)

    def grants(self, *, principal: str | None = None, securable: str | None = None) -> list[Grant]:
        """Direct grants, filtered by principal and/or securable, sorted."""
        sql, args = "SELECT principal, privilege, securable FROM grants WHERE 1=1", list[str]()
        if principal is not None:
            sql, args = sql + " AND principal = ?", [*args, principal]
        if securable is not None:
            sql, args = sql + " AND securable = ?", [*args, securable]
        rows = self._db.run_sync(lambda c: c.execute(sql + " ORDER BY 3, 1, 2", args).fetchall())
        return [Grant(*row) for row in rows]

    def effective_detail(self, principals: Sequence[Principal], securable: str) -> list[Inherited]:
        """Each privilege held on `securable` and the ancestor it is inherited from (None: granted
        directly or by ownership); `ALL PRIVILEGES` expanded. For `castellan grants show`."""
        return self._db.run_sync(lambda c: _detail(c, principals, securable))

    def granted_detail(self, principals: Sequence[Principal], securable: str) -> list[Inherited]:
        """Only what grants give (no ownership), as granted (`ALL PRIVILEGES` not expanded), with the
        ancestor each is inherited from: the shape of Unity Catalog's effective-permissions API."""
        return self._db.run_sync(lambda c: _detail(c, principals, securable, ownership=False, expand=False))

    def owner(self, securable: str) -> str | None:
        row = self._db.run_sync(
            lambda c: c.execute("SELECT owner FROM securables WHERE name = ?", (securable,)).fetchone()
        )
        return row[0] if row else None

    def securable_type(self, securable: str) -> str | None:
        row = self._db.run_sync(
            lambda c: c.execute("SELECT type FROM securables WHERE name = ?", (securable,)).fetchone()
        )
        return row[0] if row else None

    def export(self) -> dict[str, Any]:
        """The whole catalog as a deterministic document, for review in a pull request."""

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                "securables": [
                    {"name": n, "type": t, "owner": o}
                    for n, t, o in conn.execute("SELECT name, type, owner FROM securables ORDER BY 1")
                ],
                "principals": [
                    {"name": n, "kind": k} for n, k in conn.execute("SELECT name, kind FROM principals ORDER BY 1")
                ],
                "members": [
                    {"member": m, "group": g} for m, g in conn.execute("SELECT member, grp FROM members ORDER BY 2, 1")
                ],
                "grants": [
                    {"principal": p, "privilege": v, "securable": s}
                    for p, v, s in conn.execute("SELECT principal, privilege, securable FROM grants ORDER BY 3, 1, 2")
                ],
            }

        return self._db.run_sync(read)

    def replace_all(self, document: dict[str, Any]) -> None:
        """Make the catalog exactly `document` (an `export`), in one transaction; invalid means no change."""

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                for table in ("grants", "members", "principals", "securables"):
                    conn.execute(f"DELETE FROM {table}")
                for p in document.get("principals", []):
                    if p["kind"] not in PRINCIPAL_KINDS or p["name"] == ACCOUNT_USERS:
                        raise ConfigError(f"catalog document is not valid: principal {p!r}")
                    conn.execute("INSERT INTO principals VALUES (?, ?)", (p["name"], p["kind"]))
                for s in sorted(document.get("securables", []), key=lambda s: len(s["name"].split("."))):
                    if s.get("owner"):
                        _check_principal(conn, s["owner"], "an owner")
                    conn.execute(
                        "INSERT INTO securables VALUES (?, ?, ?)", (s["name"], s["type"].upper(), s.get("owner", ""))
                    )
                for m in document.get("members", []):
                    _check_member(conn, m["member"], m["group"])
                    conn.execute("INSERT INTO members VALUES (?, ?)", (m["member"], m["group"]))
                for g in document.get("grants", []):
                    privilege = normalize_privilege(g["privilege"])
                    _check_applicable(conn, privilege, g["securable"])
                    _check_principal(conn, g["principal"], "a grantee", implicit=True)
                    conn.execute("INSERT INTO grants VALUES (?, ?, ?)", (g["principal"], privilege, g["securable"]))

        try:
            self._db.run_sync(write)
        except (KeyError, TypeError, sqlite3.IntegrityError) as exc:
            raise ConfigError(f"catalog document is not valid: {exc!r}") from None

    @staticmethod
    def dumps(document: dict[str, Any]) -> str:
        return json.dumps(document, indent=2, sort_keys=False) + "\n"


def _check_applicable(conn: sqlite3.Connection, privilege: str, securable: str) -> None:
    row = conn.execute("SELECT type FROM securables WHERE name = ?", (securable,)).fetchone()
    if row is None:
        raise ConfigError(f"no securable {securable!r}: create it first (castellan grants securable add)")
    if privilege not in APPLICABLE[row[0]]:
        raise ConfigError(f"{privilege} does not apply to {row[0]} {securable}")


def _label(kind: str | None) -> str:
    return (kind or "unregistered name").replace("_", " ")


def _kind_of(conn: sqlite3.Connection, name: str) -> str | None:
    if name == ACCOUNT_USERS:
        return "group"
    row = conn.execute("SELECT kind FROM principals WHERE name = ?", (name,)).fetchone()
    return row[0] if row else None


def _check_principal(conn: sqlite3.Connection, name: str, role: str, *, implicit: bool = False) -> None:
    """`name` is a registered principal (or, with `implicit`, `account users`): nothing is ever granted
    to, owned by or a member of a name of unknown kind."""
    if name == ACCOUNT_USERS and not implicit:
        raise ConfigError(f"{ACCOUNT_USERS!r} (every principal) cannot be {role}")
    if _kind_of(conn, name) is None:
        raise ConfigError(
            f"no principal {name!r} to be {role}: register it first with "
            f"`castellan grants principal add {name} --kind user|service_principal|group`"
        )


def _check_member(conn: sqlite3.Connection, member: str, group: str) -> None:
    _check_principal(conn, member, "a member")
    kind = _kind_of(conn, group)
    if group == ACCOUNT_USERS:
        raise ConfigError(f"every principal is in {ACCOUNT_USERS!r} already")
    if kind != "group":
        what = f"a {_label(kind)}, not a group" if kind else "not a registered group"
        raise ConfigError(
            f"{group!r} is {what}: members go into groups (castellan grants principal add {group} --kind group)"
        )


def _memberships(conn: sqlite3.Connection, principals: Sequence[Principal]) -> list[str]:
    """The catalog names the caller is: each of its principals registered with the same kind, every
    group those are in (transitively), and `account users`. A name registered as another kind, or
    not registered at all, is not the caller. Names are unique across kinds, so from here on a name
    stands for one principal."""
    typed = [[p.kind, p.name] for p in dict.fromkeys(principals) if p.name]
    rows = conn.execute(
        """WITH RECURSIVE closure(name) AS (
              SELECT p.name FROM principals p JOIN json_each(?) j
                ON p.kind = json_extract(j.value, '$[0]') AND p.name = json_extract(j.value, '$[1]')
              UNION SELECT m.grp FROM members m JOIN closure c ON m.member = c.name
            ) SELECT name FROM closure""",
        (json.dumps(typed),),
    ).fetchall()
    return list(dict.fromkeys([*(r[0] for r in rows), ACCOUNT_USERS]))


def _effective(conn: sqlite3.Connection, principals: Sequence[Principal], securable: str) -> frozenset[str]:
    return frozenset(d.privilege for d in _detail(conn, principals, securable))


def _detail(
    conn: sqlite3.Connection,
    principals: Sequence[Principal],
    securable: str,
    *,
    ownership: bool = True,
    expand: bool = True,
) -> list[Inherited]:
    who = _memberships(conn, principals)
    chain = ancestors(securable)
    types = dict(
        conn.execute(
            f"SELECT name, type FROM securables WHERE name IN ({','.join('?' * len(chain))})", chain
        ).fetchall()
    )
    if securable not in types:
        return []  # as in Unity Catalog: nothing is held on an object that does not exist
    rows = conn.execute(
        f"SELECT privilege, securable FROM grants WHERE principal IN ({','.join('?' * len(who))}) "
        f"AND securable IN ({','.join('?' * len(chain))})",
        [*who, *chain],
    ).fetchall()
    held: dict[str, Inherited] = {}

    def add(privilege: str, source: str | None) -> None:
        names = ALL_EXPANDS_TO if privilege == ALL_PRIVILEGES and expand else {privilege}
        for name in names:
            current = held.get(name)
            if current is None or (current.inherited_from is not None and source is None):
                held[name] = Inherited(name, source, types.get(source) if source else None)

    for privilege, granted_on in sorted(rows, key=lambda r: (-len(r[1]), r[0])):
        add(privilege, None if granted_on == securable else granted_on)
    owner = conn.execute("SELECT owner FROM securables WHERE name = ?", (securable,)).fetchone()
    if ownership and owner is not None and owner[0] and owner[0] in who:
        add(ALL_PRIVILEGES, None)
    return sorted(held.values(), key=lambda h: h.privilege)
