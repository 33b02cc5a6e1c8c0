"""The local catalog: grants kept in SQLite, with Unity Catalog's inheritance down catalog → schema → object."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from server.errors import BackendUnavailable
from server.grants.source import ALL_PRIVILEGES
from server.sqlite import SqliteDatabase, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
  principal TEXT NOT NULL,
  privilege TEXT NOT NULL,
  securable TEXT NOT NULL,
  PRIMARY KEY (principal, privilege, securable)
);
CREATE INDEX IF NOT EXISTS grants_by_securable ON grants (securable);
"""


def ancestors(securable: str) -> list[str]:
    """`main.tools.echo` → `["main", "main.tools", "main.tools.echo"]`."""
    parts = securable.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class LocalCatalog:
    """Grants in a SQLite file. A privilege granted on a catalog or schema applies to everything below it;
    `ALL PRIVILEGES` stands for every privilege."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, schema=_SCHEMA)

    async def privileges(self, principals: Sequence[str], securable: str) -> frozenset[str]:
        if not principals:
            return frozenset()
        try:
            rows = await self._db.run(lambda c: _effective(c, principals, securable))
        except sqlite3.Error as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {exc}") from exc
        return frozenset(rows)

    def grant(self, privilege: str, securable: str, principal: str) -> None:
        self.grant_many([(principal, privilege, securable)])

    def grant_many(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Grant (principal, privilege, securable) rows; granting twice is harmless."""
        items = [(p, priv.upper(), s) for p, priv, s in rows]

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany("INSERT OR IGNORE INTO grants VALUES (?, ?, ?)", items)

        self._db.run_sync(write)

    def revoke(self, privilege: str, securable: str, principal: str) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                cur = conn.execute(
                    "DELETE FROM grants WHERE principal = ? AND privilege = ? AND securable = ?",
                    (principal, privilege.upper(), securable),
                )
                return cur.rowcount

        return self._db.run_sync(write)

    async def check(self) -> None:
        try:
            await self._db.run(lambda c: c.execute("SELECT 1 FROM grants LIMIT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {exc}") from exc

    async def close(self) -> None:
        self._db.close()


def _effective(conn: sqlite3.Connection, principals: Sequence[str], securable: str) -> set[str]:
    scopes = ancestors(securable)
    sql = (
        f"SELECT DISTINCT privilege FROM grants WHERE principal IN ({','.join('?' * len(principals))}) "
        f"AND securable IN ({','.join('?' * len(scopes))})"
    )
    held = {row[0] for row in conn.execute(sql, [*principals, *scopes])}
    if ALL_PRIVILEGES in held:
        held.add("*")
    return held
