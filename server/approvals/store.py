"""Where approval requests live: the `ApprovalStore` contract and its SQLite backend.

SQLite (a table in `<data_dir>/approvals.db`, WAL) is the default and the shared store of every
gateway process serving from one data directory: a request made by one process can be decided
through another, and the waiting process reads the decision at its next poll.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from server.approvals.request import Actor, ApprovalRequest, Status
from server.errors import BackendUnavailable, ConfigError
from server.settings import Settings
from server.sqlite import SqliteDatabase

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    binding TEXT NOT NULL,
    status TEXT NOT NULL,
    call_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    requested_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    request TEXT NOT NULL,
    decided_by TEXT,
    decided_at REAL,
    comment TEXT NOT NULL DEFAULT '',
    used_by TEXT
);
CREATE INDEX IF NOT EXISTS approvals_binding ON approvals (binding, status);
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, requested_at);
CREATE INDEX IF NOT EXISTS approvals_expiry ON approvals (expires_at);
"""
RETENTION_SECONDS = 7 * 86_400
"""Requests are kept this long past their expiry (for the CLI and the console; the audit log keeps
each call's approval for good)."""


class ApprovalStore(Protocol):
    """Approval requests, with atomic transitions: `decide` only a pending request, `use` only an
    approved one (so one approval lets exactly one call run), `expire` only a pending one.

    Raises `BackendUnavailable` when the store cannot answer (the waiting call is then denied)."""

    async def create(self, request: ApprovalRequest) -> None: ...

    async def get(self, request_id: str) -> ApprovalRequest | None: ...

    async def open_for(self, binding: str, now: float) -> ApprovalRequest | None:
        """The oldest request with this binding that is pending or approved-but-unused and not expired."""
        ...

    async def list(
        self, statuses: tuple[Status, ...] | None, now: float, limit: int, offset: int
    ) -> list[ApprovalRequest]:
        """Newest first. `pending` means still pending at `now`; `expired` includes those that lapsed."""
        ...

    async def decide(self, request_id: str, status: Status, by: Actor, comment: str, now: float) -> bool:
        """Approve or deny a request still pending at `now`; False when it was not."""
        ...

    async def use(self, request_id: str, call_id: str) -> bool:
        """Take an approved request for `call_id`; False when it was not approved (or was taken)."""
        ...

    async def expire(self, request_id: str) -> None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...


class SqliteApprovals:
    """`ApprovalStore` on one SQLite file (`backend = "sqlite"`)."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDatabase(path, schema=SCHEMA, synchronous="FULL")

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._db.transact(fn)
        except sqlite3.Error as exc:
            raise BackendUnavailable("approval", f"approval queue unavailable ({exc})") from None

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._db.run(fn)
        except sqlite3.Error as exc:
            raise BackendUnavailable("approval", f"approval queue unavailable ({exc})") from None

    async def create(self, request: ApprovalRequest) -> None:
        row = (
            request.id, request.binding, request.status, request.call_id, request.tool, request.caller.agent_id,
            request.requested_at, request.expires_at, json.dumps(request_fields(request)),
        )  # fmt: skip

        def insert(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM approvals WHERE expires_at < ?", (request.requested_at - RETENTION_SECONDS,))
            c.execute(f"INSERT INTO approvals ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)", row)

        await self._write(insert)

    async def get(self, request_id: str) -> ApprovalRequest | None:
        rows = await self._read(lambda c: c.execute(f"{_SELECT} WHERE id = ?", (request_id,)).fetchall())
        return request_from(rows[0]) if rows else None

    async def open_for(self, binding: str, now: float) -> ApprovalRequest | None:
        query = (
            f"{_SELECT} WHERE binding = ? AND status IN ('pending', 'approved') AND expires_at > ?"
            " ORDER BY requested_at LIMIT 1"
        )
        rows = await self._read(lambda c: c.execute(query, (binding, now)).fetchall())
        return request_from(rows[0]) if rows else None

    async def list(
        self, statuses: tuple[Status, ...] | None, now: float, limit: int, offset: int
    ) -> list[ApprovalRequest]:
        where, params = _status_filter(statuses, now)
        query = f"{_SELECT}{where} ORDER BY requested_at DESC, id LIMIT ? OFFSET ?"
        rows = await self._read(lambda c: c.execute(query, (*params, limit, offset)).fetchall())
        return [request_from(r) for r in rows]

    async def decide(self, request_id: str, status: Status, by: Actor, comment: str, now: float) -> bool:
        def update(c: sqlite3.Connection) -> bool:
            cursor = c.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, comment = ?"
                " WHERE id = ? AND status = 'pending' AND expires_at > ?",
                (status, json.dumps(by.as_dict()), now, comment, request_id, now),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def use(self, request_id: str, call_id: str) -> bool:
        def update(c: sqlite3.Connection) -> bool:
            cursor = c.execute(
                "UPDATE approvals SET status = 'used', used_by = ? WHERE id = ? AND status = 'approved'",
                (call_id, request_id),
            )
            return cursor.rowcount == 1

        return await self._write(update)

    async def expire(self, request_id: str) -> None:
        query = "UPDATE approvals SET status = 'expired' WHERE id = ? AND status = 'pending'"
        await self._write(lambda c: c.execute(query, (request_id,)))

    async def check(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1 FROM approvals LIMIT 1").fetchall())

    async def close(self) -> None:
        self._db.close()


_COLUMNS = "id, binding, status, call_id, tool, agent_id, requested_at, expires_at, request"
_SELECT = f"SELECT {_COLUMNS}, decided_by, decided_at, comment, used_by FROM approvals"


def _status_filter(statuses: tuple[Status, ...] | None, now: float) -> tuple[str, tuple[Any, ...]]:
    if not statuses:
        return "", ()
    clauses: list[str] = []
    params: list[Any] = []
    for status in statuses:
        if status in ("pending", "approved"):  # as they stand now: a lapsed one is expired
            clauses.append("(status = ? AND expires_at > ?)")
            params += [status, now]
        elif status == "expired":
            clauses.append("(status = 'expired' OR (status IN ('pending', 'approved') AND expires_at <= ?))")
            params.append(now)
        else:
            clauses.append("status = ?")
            params.append(status)
    return f" WHERE {' OR '.join(clauses)}", tuple(params)


def request_fields(request: ApprovalRequest) -> dict[str, Any]:
    """What a request holds beyond its indexed columns, as stored (JSON); shared with the Redis store."""
    return {
        "arguments": dict(request.arguments),
        "arguments_sha256": request.arguments_sha256,
        "caller": request.caller.as_dict(),
        "run_id": request.run_id,
        "groups": list(request.groups),
        "reason": request.reason,
        "summary": request.summary,
        "securable": request.securable,
        "annotations": dict(request.annotations),
    }


def _actor(value: dict[str, Any]) -> Actor:
    return Actor(
        agent_id=str(value.get("agent_id", "")),
        subject=str(value.get("subject", "")),
        issuer=str(value.get("issuer", "")),
        groups=tuple(value.get("groups", ())),
    )


def request_from(row: tuple[Any, ...]) -> ApprovalRequest:
    """A request from its stored columns (`_SELECT` order)."""
    rid, binding, status, call_id, tool, _agent, requested_at, expires_at, fields_json = row[:9]
    decided_by, decided_at, comment, used_by = row[9:]
    fields = json.loads(fields_json)
    return ApprovalRequest(
        id=rid,
        call_id=call_id,
        tool=tool,
        arguments=fields["arguments"],
        arguments_sha256=fields["arguments_sha256"],
        caller=_actor(fields["caller"]),
        run_id=fields["run_id"],
        groups=tuple(fields["groups"]),
        reason=fields["reason"],
        summary=fields["summary"],
        requested_at=requested_at,
        expires_at=expires_at,
        binding=binding,
        securable=fields.get("securable"),
        annotations=fields.get("annotations") or {},
        status=status,
        decided_by=_actor(json.loads(decided_by)) if decided_by else None,
        decided_at=decided_at,
        comment=comment,
        used_by=used_by,
    )


def _redis(settings: Settings) -> ApprovalStore:
    from server.approvals.redis import RedisApprovals

    return RedisApprovals(settings.approvals.redis_url or settings.metering.redis_url)


APPROVAL_STORES: dict[str, Callable[[Settings], ApprovalStore]] = {
    "sqlite": lambda settings: SqliteApprovals(settings.data_file(settings.approvals.path, "approvals.db")),
    "redis": _redis,
}


def approval_backend(settings: Settings) -> str:
    """`auto`: Redis when the meters are (replicas that share limits share the queue), else SQLite."""
    backend = settings.approvals.backend
    if backend == "auto":
        return "redis" if settings.metering.backend == "redis" else "sqlite"
    return backend


def make_approval_store(settings: Settings) -> ApprovalStore:
    backend = approval_backend(settings)
    if backend not in APPROVAL_STORES:
        raise ConfigError(
            f"unknown approvals backend {backend!r}; choose from auto, {', '.join(sorted(APPROVAL_STORES))}"
        )
    return APPROVAL_STORES[backend](settings)
