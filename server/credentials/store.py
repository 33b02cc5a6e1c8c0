"""Brokered grants at rest: one row per (upstream, user), its tokens sealed; pending authorizations."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from server.credentials.sealing import Sealer
from server.sqlite import enable_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    upstream TEXT NOT NULL,
    subject TEXT NOT NULL,
    access_token BLOB NOT NULL,
    access_expires_at REAL NOT NULL,
    refresh_token BLOB,
    scope TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    refreshed_at REAL NOT NULL,
    PRIMARY KEY (upstream, subject)
);
CREATE TABLE IF NOT EXISTS pending (
    state TEXT PRIMARY KEY,
    upstream TEXT NOT NULL,
    subject TEXT NOT NULL,
    code_verifier BLOB NOT NULL,
    expires_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Grant:
    upstream: str
    subject: str
    access_token: str
    access_expires_at: float
    refresh_token: str | None
    scope: str
    created_at: float
    refreshed_at: float


@dataclass(frozen=True, slots=True)
class GrantSummary:
    """What `castellan credentials list` shows: never a token."""

    upstream: str
    subject: str
    scope: str
    created_at: float
    refreshed_at: float
    access_expires_at: float
    refreshable: bool


@dataclass(frozen=True, slots=True)
class Pending:
    upstream: str
    subject: str
    code_verifier: str


class GrantStore:
    """SQLite (WAL) beside the gateway; every token sealed with `Sealer`, bound to (upstream, subject).
    Short statements: async callers run them in a thread. Safe to open from the CLI while the gateway runs."""

    def __init__(self, path: Path, sealer: Sealer) -> None:
        self._path = path
        self._sealer = sealer
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=10, isolation_level=None)
        enable_wal(db)
        return db

    @staticmethod
    def _context(upstream: str, subject: str, kind: str) -> str:
        return f"castellan-grant\x00{upstream}\x00{subject}\x00{kind}"

    def put(
        self, upstream: str, subject: str, access_token: str, expires_at: float, refresh_token: str | None, scope: str
    ) -> None:
        seal = self._sealer.seal
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (upstream, subject) DO UPDATE SET "
                "access_token = excluded.access_token, access_expires_at = excluded.access_expires_at, "
                "refresh_token = COALESCE(excluded.refresh_token, grants.refresh_token), "
                "scope = excluded.scope, refreshed_at = excluded.refreshed_at",
                (
                    upstream,
                    subject,
                    seal(access_token, self._context(upstream, subject, "access")),
                    expires_at,
                    seal(refresh_token, self._context(upstream, subject, "refresh")) if refresh_token else None,
                    scope,
                    now,
                    now,
                ),
            )

    def get(self, upstream: str, subject: str) -> Grant | None:
        with self._db() as db:
            row = db.execute(
                "SELECT access_token, access_expires_at, refresh_token, scope, created_at, refreshed_at "
                "FROM grants WHERE upstream = ? AND subject = ?",
                (upstream, subject),
            ).fetchone()
        if row is None:
            return None
        opened = self._sealer.open
        refresh = opened(row[2], self._context(upstream, subject, "refresh")) if row[2] is not None else None
        return Grant(
            upstream, subject, opened(row[0], self._context(upstream, subject, "access")), row[1], refresh, *row[3:6]
        )

    def revoke(self, upstream: str | None, subject: str) -> int:
        """Deletes the user's grants (for one upstream, or all); the number removed."""
        with self._db() as db:
            if upstream is None:
                return db.execute("DELETE FROM grants WHERE subject = ?", (subject,)).rowcount
            return db.execute("DELETE FROM grants WHERE upstream = ? AND subject = ?", (upstream, subject)).rowcount

    def summaries(self) -> list[GrantSummary]:
        with self._db() as db:
            rows = db.execute(
                "SELECT upstream, subject, scope, created_at, refreshed_at, access_expires_at, "
                "refresh_token IS NOT NULL FROM grants ORDER BY upstream, subject"
            ).fetchall()
        return [GrantSummary(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]

    def begin(self, state: str, upstream: str, subject: str, code_verifier: str, ttl: float) -> None:
        now = time.time()
        with self._db() as db:
            db.execute("DELETE FROM pending WHERE expires_at < ?", (now,))
            db.execute(
                "INSERT INTO pending VALUES (?, ?, ?, ?, ?)",
                (
                    state,
                    upstream,
                    subject,
                    self._sealer.seal(code_verifier, f"castellan-pending\x00{state}"),
                    now + ttl,
                ),
            )

    def take(self, state: str) -> Pending | None:
        """The pending authorization for `state`, once: it is deleted as it is read (a link works one time)."""
        with self._db() as db:
            row = db.execute(
                "DELETE FROM pending WHERE state = ? RETURNING upstream, subject, code_verifier, expires_at", (state,)
            ).fetchone()
        if row is None or row[3] < time.time():
            return None
        return Pending(row[0], row[1], self._sealer.open(row[2], f"castellan-pending\x00{state}"))
