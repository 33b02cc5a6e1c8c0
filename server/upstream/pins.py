"""Pinning upstream tool definitions: a changed definition is quarantined until an admin approves it.

Each upstream tool's definition (title, description, input and output schemas, annotations) is hashed.
The first definition seen is trusted (trust on first use) unless `pin = "manual"`; after that, a
definition whose hash differs from the approved one is quarantined: hidden from tools/list and
denied on tools/call, until `castellan tools approve NAME` approves the new hash. A definition now
offered by a different upstream than the one it was approved for is quarantined too.

Refused tools (a colliding name or securable, an input schema that cannot be validated safely) are
recorded here as well, by the gateway, so `castellan tools list/show` can show them with the reason.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from server.sqlite import enable_wal, transaction

Status = Literal["approved", "quarantined"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
  tool TEXT PRIMARY KEY,
  upstream TEXT NOT NULL,
  approved_hash TEXT,
  seen_hash TEXT NOT NULL,
  seen_definition TEXT NOT NULL,
  first_seen REAL NOT NULL,
  changed_at REAL NOT NULL,
  approved_at REAL,
  approved_by TEXT
);
CREATE TABLE IF NOT EXISTS refusals (
  upstream TEXT NOT NULL,
  upstream_tool TEXT NOT NULL,
  tool TEXT NOT NULL,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  definition TEXT NOT NULL,
  first_seen REAL NOT NULL,
  PRIMARY KEY (upstream, upstream_tool)
);
"""


def definition_hash(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Pin:
    tool: str
    upstream: str
    status: Status
    approved_hash: str | None
    seen_hash: str
    definition: dict[str, Any]
    approved_by: str | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream tool the gateway will not serve, and why: `kind` is "collision" (its name or
    securable is another tool's), "schema" (its input schema cannot be validated safely) or "name"."""

    tool: str
    upstream: str
    upstream_tool: str
    kind: str
    reason: str
    definition: dict[str, Any]


class PinStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        enable_wal(self._conn)
        self._conn.executescript(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(pins)")}
        if "approved_definition" not in columns:  # kept since the console shows a diff against it
            self._conn.execute("ALTER TABLE pins ADD COLUMN approved_definition TEXT")

    def observe(self, tool: str, upstream: str, definition: Mapping[str, Any], trust_first: bool) -> Status:
        """Records the definition now offered by the upstream; returns whether it may be served."""
        digest = definition_hash(definition)
        now = time.time()
        with transaction(self._conn) as conn:
            row = conn.execute("SELECT approved_hash, seen_hash, upstream FROM pins WHERE tool = ?", (tool,)).fetchone()
            body = json.dumps(definition, sort_keys=True)
            if row is None:
                approved = digest if trust_first else None
                conn.execute(
                    "INSERT INTO pins VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tool, upstream, approved, digest, body, now, now, now if approved else None,
                     "first use" if approved else None, body if approved else None),
                )  # fmt: skip
                return "approved" if approved else "quarantined"
            approved_hash, seen_hash, owner = row
            if owner != upstream:
                # Now offered by another upstream: whatever was approved was approved for the other one.
                conn.execute(
                    "UPDATE pins SET upstream = ?, approved_hash = NULL, approved_at = NULL, approved_by = NULL,"
                    " approved_definition = NULL,"
                    " seen_hash = ?, seen_definition = ?, changed_at = ? WHERE tool = ?",
                    (upstream, digest, body, now, tool),
                )
                return "quarantined"
            if seen_hash != digest:
                conn.execute(
                    "UPDATE pins SET seen_hash = ?, seen_definition = ?, changed_at = ? WHERE tool = ?",
                    (digest, body, now, tool),
                )
        return "approved" if approved_hash == digest else "quarantined"

    def status(self, tool: str) -> Status | None:
        row = self._conn.execute("SELECT approved_hash, seen_hash FROM pins WHERE tool = ?", (tool,)).fetchone()
        if row is None:
            return None
        return "approved" if row[0] == row[1] else "quarantined"

    def approve(self, tool: str, by: str) -> Pin:
        """Approves the definition last seen for `tool`. Raises KeyError for an unknown tool, and
        `ValueError` for one whose definition is refused (approval cannot make it safe to serve)."""
        refused = [r for r in self.refusals() if r.tool == tool and r.kind == "schema"]
        if refused:
            raise ValueError(f"{tool} is refused, not quarantined: {refused[0].reason}")
        with transaction(self._conn) as conn:
            updated = conn.execute(
                "UPDATE pins SET approved_hash = seen_hash, approved_definition = seen_definition, approved_at = ?,"
                " approved_by = ? WHERE tool = ?",
                (time.time(), by, tool),
            ).rowcount
        if not updated:
            raise KeyError(tool)
        return next(p for p in self.list() if p.tool == tool)

    def list(self) -> list[Pin]:
        rows = self._conn.execute(
            "SELECT tool, upstream, approved_hash, seen_hash, seen_definition, approved_by FROM pins ORDER BY tool"
        ).fetchall()
        return [
            Pin(r[0], r[1], "approved" if r[2] == r[3] else "quarantined", r[2], r[3], json.loads(r[4]), r[5])
            for r in rows
        ]

    def approved_definition(self, tool: str) -> dict[str, Any] | None:
        """The definition last approved for `tool` (None: none approved, or approved before it was kept)."""
        row = self._conn.execute("SELECT approved_definition FROM pins WHERE tool = ?", (tool,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def record_refusals(self, upstream: str, refusals: Sequence[Refusal]) -> builtins.list[Refusal]:
        """Makes `refusals` the current refusals of `upstream`'s tools; returns those not recorded
        before (or whose reason changed), for the log."""
        with transaction(self._conn) as conn:
            before = {
                (r[0], r[1]): r[2]
                for r in conn.execute(
                    "SELECT upstream_tool, kind, reason FROM refusals WHERE upstream = ?", (upstream,)
                )
            }
            conn.execute("DELETE FROM refusals WHERE upstream = ?", (upstream,))
            now = time.time()
            for r in refusals:
                conn.execute(
                    "INSERT OR REPLACE INTO refusals VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        upstream,
                        r.upstream_tool,
                        r.tool,
                        r.kind,
                        r.reason,
                        json.dumps(r.definition, sort_keys=True),
                        now,
                    ),
                )
        return [r for r in refusals if before.get((r.upstream_tool, r.kind)) != r.reason]

    def refusals(self) -> builtins.list[Refusal]:
        rows = self._conn.execute(
            "SELECT tool, upstream, upstream_tool, kind, reason, definition FROM refusals ORDER BY tool, upstream"
        ).fetchall()
        return [Refusal(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def close(self) -> None:
        self._conn.close()
