"""The audit outbox: an append-only SQLite table, each record committed durably (WAL, synchronous=FULL),
chained with a key kept outside it and checkpointed to a signed file beside it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from server.audit.chain import GENESIS, Verification, legacy_heads, read_rows, record_mac, verify_rows
from server.audit.checkpoints import CheckpointLog
from server.audit.encoding import decode, encode
from server.audit.instances import InstanceLocks
from server.audit.keys import ChainKey
from server.audit.search import AuditQuery, search, show
from server.errors import BackendUnavailable
from server.in_flight import alone
from server.sqlite import SqliteDatabase

log = structlog.get_logger("castellan.audit")

Kind = Literal["decision", "outcome"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  call_id TEXT NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('decision', 'outcome')),
  ts REAL NOT NULL,
  record TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL,
  shipped_at REAL,
  key_id TEXT,
  instance TEXT,
  UNIQUE (call_id, kind)
);
CREATE INDEX IF NOT EXISTS outbox_unshipped ON outbox (shipped_at, seq);
CREATE TABLE IF NOT EXISTS chain_heads (
  seq INTEGER PRIMARY KEY,
  hash TEXT NOT NULL,
  recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retention (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  through_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS probe (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ship_state (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
"""
# Version 2: keyed records (`key_id`, `instance` covered by the MAC); retention may remove shipped
# records below the retained mark, nothing else may delete or change a record. Version 3: the
# `outbox_open (kind, instance)` index of version 2 is gone: no hot query used it, and every commit
# wrote its pages (8.3 WAL pages per two-record commit with it, 6.1 without).
_GUARDS = """
DROP TRIGGER IF EXISTS outbox_no_delete;
DROP TRIGGER IF EXISTS outbox_no_update;
CREATE TRIGGER outbox_no_delete BEFORE DELETE ON outbox
WHEN OLD.shipped_at IS NULL OR OLD.seq > (SELECT COALESCE(MAX(through_seq), 0) FROM retention)
BEGIN SELECT RAISE(ABORT, 'the audit outbox is append-only'); END;
CREATE TRIGGER outbox_no_update BEFORE UPDATE OF seq, call_id, kind, ts, record, prev_hash, hash, key_id, instance
ON outbox BEGIN SELECT RAISE(ABORT, 'audit records cannot be changed'); END;
DROP INDEX IF EXISTS outbox_open;
PRAGMA user_version = 3;
"""
_VERSION = 3
# An allowed call with no outcome whose writer is gone: closed with this outcome at the next start.
INTERRUPTED = "interrupted"


@dataclass(slots=True)
class PendingCall:
    """One call's records waiting to be shipped."""

    call_id: str
    seqs: list[int] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    decided_at: float = 0.0
    outcome: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Unfinished:
    """Allowed calls without an outcome for longer than asked: how many, the oldest's age, some ids."""

    count: int
    oldest_seconds: float
    call_ids: tuple[str, ...]


class Outbox(Protocol):
    """Where audit records are committed. `write` returns only once the record is durable;
    it raises `BackendUnavailable("audit", ...)` when it cannot write. `write_later` returns at once:
    the record is group-committed within the outbox's bounded interval (an outcome, off the response
    path; a crash inside the interval leaves its call to be closed as `interrupted`)."""

    async def write(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None: ...

    def write_later(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...


def _migrate(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA user_version").fetchone()[0] >= _VERSION:
        return
    columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    conn.execute("BEGIN IMMEDIATE")
    try:
        for column in ("key_id", "instance"):
            if column not in columns:
                conn.execute(f"ALTER TABLE outbox ADD COLUMN {column} TEXT")
        for statement in _GUARDS.strip().split(";\n"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_MAX_OWED_OUTCOMES = 10_000
# A record is ready to ship when its call is finished: it is the outcome, or its call has one, or its
# decision stopped the call. In that order: the outcome's existence is one probe of the
# (call_id, kind) index, where the decision's verdict parses the whole record (json_extract), now
# only for a call without an outcome (denied, or still running).
_IS_READY = (
    "(u.kind = 'outcome' OR EXISTS (SELECT 1 FROM outbox o WHERE o.call_id = u.call_id AND o.kind = 'outcome')"
    " OR json_extract(u.record, '$.decision') IS NOT 'allow')"
)
_READY = (
    f"SELECT u.call_id FROM outbox u WHERE u.shipped_at IS NULL AND {_IS_READY}"
    " GROUP BY u.call_id ORDER BY MIN(u.seq) LIMIT ?"
)
_OLDEST_READY = f"SELECT MIN(u.ts) FROM outbox u WHERE u.shipped_at IS NULL AND {_IS_READY}"
_NOT_SHIPPED = "'$.decision_input', '$.content', '$.detections', '$.injection_markers'"
"""What a trace never carries (`traces.plan_trace` reads none of it): the policy engine's whole input
and the tool's returned content, half of a call's record bytes. Removed by SQLite before the record
reaches Python: the JSON decode of the shipper's batch then costs half (88 -> 54 us a call, measured)."""


class SqliteOutbox:
    """Appends audit records; `write` returns only once the row is committed to disk.

    Each record is MACed with `key` over its position, content, writer instance and the previous
    record's MAC. A checkpoint of the head goes to `checkpoints` (default `<db stem>-checkpoints.jsonl`
    beside it) at most `checkpoint_seconds` after any write, and on `close`.

    Raises `BackendUnavailable("audit", ...)` when it cannot write: the caller denies the call.
    """

    def __init__(
        self,
        path: Path,
        *,
        key: ChainKey,
        checkpoints: Path | None = None,
        checkpoint_seconds: float = 2.0,
        outcome_commit_seconds: float = 0.0,
    ) -> None:
        self.path = path
        self.outcome_commit_seconds = outcome_commit_seconds
        self.key = key
        self.instance = uuid.uuid4().hex[:16]
        self.checkpoints = CheckpointLog(checkpoints or path.with_name(f"{path.stem}-checkpoints.jsonl"), key)
        self._checkpoint_seconds = checkpoint_seconds
        self._checkpointed: int | None = None
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self.checkpoint_error: str | None = None
        self.instances = InstanceLocks(path.with_name(f"{path.stem}-instances"), self.instance)
        self._wrote = False
        self._closed = False
        self._owed: dict[str, dict[str, Any]] = {}  # outcomes whose write failed, by call id
        self._db = SqliteDatabase(path, schema=_SCHEMA, synchronous="FULL")
        self._db.run_sync(_migrate)
        self._key_id = key.key_id
        # (transaction, seq, hash) of the last record this outbox appended: the head the next record
        # of the same transaction chains to, without reading it again (the transaction's thread's only).
        self._head: tuple[int, int, str] | None = None

    # -- writing ------------------------------------------------------------------------------------

    async def write(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None:
        """Appends one record. An outcome that cannot be written (a full disk, a lock) is owed: its
        call ran, so it is kept and appended by a later write or readiness probe that succeeds
        (else its allowed decision stays open until a restart closes it as `interrupted`)."""
        try:
            await self._append(kind, call_id, record)
        except BackendUnavailable:
            if kind == "outcome" and (call_id in self._owed or len(self._owed) < _MAX_OWED_OUTCOMES):
                self._owed[call_id] = record  # the latest word on the call wins (e.g. "then audit failed")
            raise
        if kind == "outcome":
            self._owed.pop(call_id, None)
        if self._owed:
            await self._write_owed()

    def write_later(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None:
        """Queues one record for the next group commit, at most `outcome_commit_seconds` away (with
        0 it is committed now, still without waiting). One that cannot be written is owed like a
        failed `write` (kept, appended by the next write or probe that succeeds), and logged."""
        future = self._db.defer(self._insert(kind, call_id, record), self.outcome_commit_seconds)
        future.add_done_callback(lambda done: self._written_later(done, kind, call_id, record))

    def _written_later(self, done: asyncio.Future[None], kind: Kind, call_id: str, record: dict[str, Any]) -> None:
        exc = None if done.cancelled() else done.exception()
        if done.cancelled() or exc is not None:
            if call_id in self._owed or len(self._owed) < _MAX_OWED_OUTCOMES:
                self._owed[call_id] = record
            log.error("audit_write_failed", call_id=call_id, kind=kind, error=str(exc), owed=len(self._owed))
            return
        self._wrote = True
        if kind == "outcome":
            self._owed.pop(call_id, None)
        with contextlib.suppress(RuntimeError):  # no running loop: at shutdown, close() checkpoints
            self._schedule_checkpoint()

    async def _write_owed(self) -> None:
        for call_id, record in list(self._owed.items()):
            try:
                await self._append("outcome", call_id, record)
            except BackendUnavailable:
                return
            self._owed.pop(call_id, None)
            log.info("audit_outcome_written_late", call_id=call_id, still_owed=len(self._owed))

    async def _append(self, kind: Kind, call_id: str, record: dict[str, Any]) -> None:
        try:
            # A lone call commits on the loop's thread (nothing else for the loop to do meanwhile).
            await self._db.transact(self._insert(kind, call_id, record), inline=alone())
        except sqlite3.Error as exc:
            raise BackendUnavailable("audit", f"audit log unavailable: {exc}") from exc
        self._wrote = True
        self._schedule_checkpoint()

    def _insert(self, kind: Kind, call_id: str, record: dict[str, Any]) -> Callable[[sqlite3.Connection], None]:
        """The write of one record, chained to the one before it (computed inside the transaction)."""
        body = encode(record)  # standard JSON (server/audit/encoding.py), which SQLite's JSON functions read
        key, key_id, instance = self.key, self._key_id, self.instance

        def insert(conn: sqlite3.Connection) -> None:
            db = self._db
            head = self._head
            if head is not None and head[0] == db.transaction:  # a record before it in this transaction
                last: tuple[int, str] | None = (head[1], head[2])
            else:
                last = conn.execute("SELECT seq, hash FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
                if last is None:  # empty: the first record, or the one after what retention removed
                    kept = conn.execute("SELECT MAX(through_seq) FROM retention").fetchone()[0]
                    last = (kept, self._retained_head(kept)) if kept else None
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            ts = time.time()
            digest = record_mac(key, prev, seq, call_id, kind, ts, body, instance)
            conn.execute(
                "INSERT INTO outbox (seq, call_id, kind, ts, record, prev_hash, hash, key_id, instance)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, call_id, kind, ts, body, prev, digest, key_id, instance),
            )
            self._head = (db.transaction, seq, digest)

        return insert

    def _retained_head(self, through: int) -> str:
        found = [cp for cp in self.checkpoints.read()[0] if cp.kind == "retained" and cp.seq == through]
        if not found:
            raise sqlite3.DatabaseError(f"no retained checkpoint for record {through}: cannot continue the chain")
        return found[-1].head

    # -- lifecycle: the writer instance -------------------------------------------------------------

    async def start(self) -> list[dict[str, Any]]:
        """Become the writing instance: take its lock, seal an unkeyed chain with a `keyed`
        checkpoint, and close as `interrupted` the unfinished calls of instances that are gone.
        Returns the decision records of the calls it closed (what they held can be released)."""
        self.instances.acquire()
        await self._db.run(self._seal_unkeyed)
        return await self.close_interrupted()

    def _seal_unkeyed(self, conn: sqlite3.Connection) -> None:
        last = conn.execute("SELECT seq, hash, key_id FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None or last[2] is not None:
            return
        if any(cp.kind == "keyed" for cp in self.checkpoints.read()[0]):
            return
        self.checkpoints.append("keyed", int(last[0]), str(last[1]), self.instance)
        log.info("audit_chain_keyed", unkeyed_records=int(last[0]), key_id=self.key.key_id)

    async def close_interrupted(self) -> list[dict[str, Any]]:
        """Appends an `interrupted` outcome to every allowed call of a gone instance that has none."""

        def find(conn: sqlite3.Connection) -> list[tuple[str, str | None, str]]:
            return [
                (str(call_id), instance, str(record))
                for call_id, instance, record in conn.execute(
                    "SELECT d.call_id, d.instance, d.record FROM outbox d WHERE d.shipped_at IS NULL"
                    " AND d.kind = 'decision' AND json_extract(d.record, '$.decision') = 'allow' AND NOT EXISTS"
                    " (SELECT 1 FROM outbox o WHERE o.call_id = d.call_id AND o.kind = 'outcome') ORDER BY d.seq"
                )
            ]

        open_calls = await self._db.run(find)
        alive: dict[str | None, bool] = {}
        closed: list[dict[str, Any]] = []
        for call_id, instance, record in open_calls:
            if instance not in alive:
                alive[instance] = self.instances.alive(instance)
            if alive[instance]:
                continue
            decision = decode(record)
            await self.write("outcome", call_id, interrupted_outcome(call_id, instance, self.instance))
            closed.append(decision)
        if closed:
            log.warning("audit_calls_interrupted", calls=len(closed), closed_by=self.instance)
        return closed

    # -- checkpoints --------------------------------------------------------------------------------

    def _schedule_checkpoint(self) -> None:
        if self._checkpoint_timer is not None or self._checkpoint_seconds <= 0 or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._checkpoint_timer = loop.call_later(self._checkpoint_seconds, self._checkpoint_due)

    def _checkpoint_due(self) -> None:
        self._checkpoint_timer = None
        self._checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint_async())

    async def _checkpoint_async(self) -> None:
        try:
            await self._db.run(self._checkpoint)
        except Exception as exc:  # reported by check() and readiness; the next write retries
            if self.checkpoint_error is None:
                log.error("audit_checkpoint_failed", error=str(exc), path=str(self.checkpoints.path))
            self.checkpoint_error = f"{type(exc).__name__}: {exc}"

    def _checkpoint(self, conn: sqlite3.Connection) -> tuple[int, str]:
        last = conn.execute("SELECT seq, hash FROM outbox ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None:
            return 0, GENESIS
        seq, head = int(last[0]), str(last[1])
        if seq != self._checkpointed:
            self.checkpoints.append("head", seq, head, self.instance)
            self._checkpointed = seq
            self.checkpoint_error = None
        return seq, head

    def record_head(self) -> tuple[int, str]:
        """Checkpoint the current chain head now (at shutdown, or on demand), after committing what
        waits for its group commit; returns it."""
        self._db.commit_deferred()
        return self._db.run_sync(self._checkpoint)

    # -- reading ------------------------------------------------------------------------------------

    async def records(self, call_id: str) -> dict[str, dict[str, Any]]:
        """The records of one call, by kind."""
        rows = await self._db.run(
            lambda c: c.execute("SELECT kind, record FROM outbox WHERE call_id = ?", (call_id,)).fetchall()
        )
        return {kind: decode(record) for kind, record in rows}

    async def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest decision records, newest first."""
        rows = await self._db.run(
            lambda c: c.execute(
                "SELECT record FROM outbox WHERE kind = 'decision' ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        )
        return [decode(r[0]) for r in rows]

    def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        return self._db.run_sync(lambda c: search(c, query))

    def show(self, call_id: str) -> dict[str, Any] | None:
        return self._db.run_sync(lambda c: show(c, call_id))

    async def search_async(self, query: AuditQuery) -> list[dict[str, Any]]:
        return await self._db.run(lambda c: search(c, query))

    async def show_async(self, call_id: str) -> dict[str, Any] | None:
        return await self._db.run(lambda c: show(c, call_id))

    # -- shipping -----------------------------------------------------------------------------------

    async def pending(self, limit: int) -> list[PendingCall]:
        """Calls ready to ship, oldest first: finished (an outcome, or a decision that stopped the call).
        An allowed call still running never holds back the ones behind it. Each record comes without
        what a trace never carries (`_NOT_SHIPPED`): this is the shipper's read, not the record."""

        def read(conn: sqlite3.Connection) -> list[PendingCall]:
            ids = [r[0] for r in conn.execute(_READY, (limit,))]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT seq, call_id, kind, ts, json_remove(record, {_NOT_SHIPPED}) FROM outbox"
                f" WHERE call_id IN ({marks}) ORDER BY seq",
                ids,
            ).fetchall()
            calls: dict[str, PendingCall] = {}
            for seq, call_id, kind, ts, record in rows:
                call = calls.setdefault(call_id, PendingCall(call_id))
                call.seqs.append(seq)
                if kind == "decision":
                    call.decision, call.decided_at = decode(record), ts
                else:
                    call.outcome = decode(record)
            return [c for c in calls.values() if c.decision is not None]

        return await self._db.run(read)

    async def unfinished(self, older_than: float) -> Unfinished:
        """Allowed calls with no outcome for more than `older_than` seconds (still running, or cut off)."""

        def read(conn: sqlite3.Connection) -> Unfinished:
            rows = conn.execute(
                "SELECT d.call_id, d.ts FROM outbox d WHERE d.kind = 'decision' AND d.shipped_at IS NULL"
                " AND d.ts < ? AND json_extract(d.record, '$.decision') = 'allow' AND NOT EXISTS"
                " (SELECT 1 FROM outbox o WHERE o.call_id = d.call_id AND o.kind = 'outcome') ORDER BY d.seq",
                (time.time() - older_than,),
            ).fetchall()
            oldest = time.time() - rows[0][1] if rows else 0.0
            return Unfinished(len(rows), oldest, tuple(r[0] for r in rows[:20]))

        return await self._db.run(read)

    async def mark_shipped(self, seqs: list[int]) -> None:
        """Marks records shipped, once their trace is confirmed written."""
        if not seqs:
            return
        now = time.time()
        marks = ",".join("?" * len(seqs))
        await self._db.transact(
            lambda c: c.execute(f"UPDATE outbox SET shipped_at = ? WHERE seq IN ({marks})", [now, *seqs])
        )

    async def ship_state(self, name: str) -> str | None:
        row = await self._db.run(lambda c: c.execute("SELECT value FROM ship_state WHERE name = ?", (name,)).fetchone())
        return str(row[0]) if row else None

    async def set_ship_state(self, name: str, value: str) -> None:
        await self._db.transact(
            lambda c: c.execute("INSERT OR REPLACE INTO ship_state (name, value) VALUES (?, ?)", (name, value))
        )

    async def backlog(self) -> tuple[int, float]:
        """(records not yet shipped, seconds the oldest ready one has waited; 0 when none).
        A call still running is not lag: it is reported by `unfinished`."""

        def read(conn: sqlite3.Connection) -> tuple[int, float]:
            count = conn.execute("SELECT COUNT(*) FROM outbox WHERE shipped_at IS NULL").fetchone()[0]
            oldest = conn.execute(_OLDEST_READY).fetchone()[0]
            return int(count), time.time() - oldest if oldest is not None else 0.0

        return await self._db.run(read)

    # -- retention ----------------------------------------------------------------------------------

    async def prune(self, older_than_seconds: float, batch: int = 5_000) -> int:
        """Removes shipped records older than `older_than_seconds`, oldest first, never an unshipped
        one, nor anything of a call with a record still unshipped, nor the newest record (the chain
        continues from it). A `retained` checkpoint of the last removed record is written first, so
        `verify` still proves the kept part. Returns how many records it removed."""

        def plan(conn: sqlite3.Connection) -> tuple[int, str] | None:
            cutoff = time.time() - older_than_seconds
            bounds = conn.execute(
                "SELECT MIN(seq) FROM (SELECT MIN(seq) AS seq FROM outbox WHERE shipped_at IS NULL OR ts >= ?"
                " UNION ALL SELECT MIN(d.seq) FROM outbox d JOIN outbox u ON u.call_id = d.call_id"
                " WHERE u.shipped_at IS NULL UNION ALL SELECT MAX(seq) FROM outbox)",
                (cutoff,),
            ).fetchone()
            first = conn.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]
            if bounds[0] is None or first is None or bounds[0] - 1 < first:
                return None
            through = min(int(bounds[0]) - 1, first + batch - 1)
            head = conn.execute("SELECT hash FROM outbox WHERE seq = ?", (through,)).fetchone()
            return (through, str(head[0])) if head else None

        found = await self._db.run(plan)
        if found is None:
            return 0
        through, head = found
        await self._db.run(lambda _: self.checkpoints.append("retained", through, head, self.instance))

        def remove(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT OR REPLACE INTO retention (id, through_seq) VALUES (1, ?)", (through,))
            conn.execute("DELETE FROM chain_heads WHERE seq <= ?", (through,))
            return int(conn.execute("DELETE FROM outbox WHERE seq <= ?", (through,)).rowcount)

        removed = await self._db.transact(remove)
        log.info("audit_records_retired", through_seq=through, removed=removed)
        return removed

    async def compact_checkpoints(self) -> int:
        """Drops the checkpoints retention made moot (see `CheckpointLog.compact`), off the database
        thread: appends wait for it on the log's lock, writes do not."""
        through = await self._db.run(lambda c: c.execute("SELECT MAX(through_seq) FROM retention").fetchone()[0])
        if not through:
            return 0
        return await asyncio.to_thread(self.checkpoints.compact, int(through))

    # -- verification and health --------------------------------------------------------------------

    def verify(
        self, expected_heads: list[tuple[int, str]] | None = None, extra: list[Any] | None = None
    ) -> Verification:
        """Recompute the chain and check it against the checkpoints (synchronous: for the CLI).
        `extra`: more checkpoints (e.g. the copies shipped to MLflow); `expected_heads`: (seq, hash)
        pairs the caller trusts."""
        checkpoints, unreadable = self.checkpoints.read()

        def run(conn: sqlite3.Connection) -> Verification:
            result = verify_rows(
                read_rows(conn),
                self.key,
                [*checkpoints, *(extra or [])],
                unreadable,
                expected_heads or [],
                legacy_heads(conn),
            )
            interrupted = [
                r[0]
                for r in conn.execute(
                    "SELECT call_id FROM outbox WHERE kind = 'outcome' AND json_extract(record, '$.interrupted') = 1"
                    " ORDER BY seq"
                )
            ]
            unfinished = [
                r[0]
                for r in conn.execute(
                    "SELECT d.call_id FROM outbox d WHERE d.kind = 'decision' AND json_extract(d.record,"
                    " '$.decision') = 'allow' AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.call_id = d.call_id"
                    " AND o.kind = 'outcome') ORDER BY d.seq"
                )
            ]
            return replace(result, interrupted=tuple(interrupted), unfinished=tuple(unfinished))

        return self._db.run_sync(run)

    async def check(self) -> None:
        """A real write (a probe row, committed like a record): a full disk or a locked file fails here."""
        try:
            await self._db.transact(
                lambda c: c.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),))
            )
        except sqlite3.Error as exc:
            raise BackendUnavailable("audit", f"audit log cannot write: {exc}") from exc
        if self._owed:
            await self._write_owed()
        if self.checkpoint_error is not None:
            raise BackendUnavailable("audit", f"audit checkpoints cannot be written: {self.checkpoint_error}")

    async def close(self) -> None:
        self._closed = True
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        if self._checkpoint_task is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint_task
        with contextlib.suppress(Exception):
            self._db.commit_deferred()  # outcomes waiting for their group commit
        with contextlib.suppress(Exception):
            if self._wrote:  # a writer: its last head, signed, outside the database
                self._db.run_sync(self._checkpoint)
        self._db.close()
        self.instances.release()


def interrupted_outcome(call_id: str, instance: str | None, closed_by: str) -> dict[str, Any]:
    """The outcome of a call whose gateway stopped (killed, crashed) before it finished."""
    return {
        "call_id": call_id,
        "is_error": True,
        "interrupted": True,
        "error": f"interrupted: gateway instance {instance or 'unknown'} stopped before the call finished",
        "closed_by": closed_by,
        "result_preview": None,
        "result_chars": 0,
        "tokens_in": 0,
        "tokens_out": 0,
        "latency_ms": None,
        "timings_ms": {},
        "flags": [INTERRUPTED],
        "injection_markers": [],
    }
