"""The console's read-side index of the audit log: one narrow, indexed row per call, projected from the
outbox (read-only) into a database of its own, so filters and charts over 100,000 calls answer in
milliseconds without a JSON scan of every record and without adding work to the audit write path.

The outbox stays the record: the index holds no field that is not in it, can be deleted at any time
(it is rebuilt), follows retention (calls whose records were removed leave the index), and is caught
up before every query (bounded), so a page shows what the outbox held a moment before. A full record
is always read from the outbox (`server.audit.search.show`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from server.audit.search import OUTCOMES, AuditQuery
from server.sqlite import enable_wal

log = structlog.get_logger("castellan.console")
T = TypeVar("T")

_VERSION = 3
SLOT = 900
_FOLLOW_SECONDS = 300.0
_FOLLOW_STEP = 5_000
"""Seconds per slot of the charts' summaries (calls, policy versions); agents' spend and reasons by hour."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
  seq INTEGER PRIMARY KEY,          -- the decision record's position in the outbox
  call_id TEXT NOT NULL UNIQUE,
  ts REAL NOT NULL,
  action TEXT, agent TEXT, subject TEXT, tool TEXT, decision TEXT, stage TEXT,
  policy_version TEXT, run_id TEXT, reasons TEXT,
  outcome_seq INTEGER, is_error INTEGER, interrupted INTEGER, flags TEXT,
  tokens INTEGER, latency_ms REAL,
  shadow TEXT, shadow_version TEXT, shadow_late INTEGER
  -- shadow: what the shadow policy said against the live one (agree, allow_to_deny, deny_to_allow,
  -- obligations, error); from the decision record (a refusal) or, shadow_late = 1, the outcome's
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);
CREATE INDEX IF NOT EXISTS calls_agent ON calls (agent, seq);
CREATE INDEX IF NOT EXISTS calls_subject ON calls (subject, seq);
CREATE INDEX IF NOT EXISTS calls_tool ON calls (tool, seq);
CREATE INDEX IF NOT EXISTS calls_decision ON calls (decision, seq);
CREATE INDEX IF NOT EXISTS calls_stage ON calls (stage, seq);
CREATE INDEX IF NOT EXISTS calls_policy ON calls (policy_version, seq);
CREATE INDEX IF NOT EXISTS calls_run ON calls (run_id, seq);
CREATE INDEX IF NOT EXISTS calls_outcome ON calls (outcome_seq);
CREATE INDEX IF NOT EXISTS calls_shadow_diff ON calls (seq)
  WHERE shadow IN ('allow_to_deny', 'deny_to_allow', 'obligations', 'differs');
CREATE TABLE IF NOT EXISTS call_groups (grp TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (grp, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS call_groups_seq ON call_groups (seq);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
-- Summaries for the charts, kept exact as calls enter and leave (retention) the index.
CREATE TABLE IF NOT EXISTS tool_15m (t INTEGER NOT NULL, tool TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (t, tool)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tool_1h (t INTEGER NOT NULL, tool TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (t, tool)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS denial_15m (t INTEGER NOT NULL, stage TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (t, stage)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS denial_1h (t INTEGER NOT NULL, stage TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (t, stage)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slot_policy (slot INTEGER NOT NULL, policy_version TEXT NOT NULL, decision TEXT NOT NULL,
  n INTEGER NOT NULL, first_ts REAL NOT NULL, last_ts REAL NOT NULL,
  PRIMARY KEY (slot, policy_version, decision)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hour_agent (hour INTEGER NOT NULL, agent TEXT NOT NULL, calls INTEGER NOT NULL,
  tokens INTEGER NOT NULL, last_seq INTEGER NOT NULL, PRIMARY KEY (hour, agent)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hour_reason (hour INTEGER NOT NULL, reason TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (hour, reason)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slot_shadow (slot INTEGER NOT NULL, policy_version TEXT NOT NULL,
  shadow_version TEXT NOT NULL, change TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (slot, policy_version, shadow_version, change)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS facets (name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (name, value)) WITHOUT ROWID;
"""
# Each summary of the calls `WHERE {where}`, added with sign +1 (entering) or -1 (leaving the index).
GRAINS = {"15m": 900, "1h": 3600}
SHADOW_CHANGES = ("allow_to_deny", "deny_to_allow", "obligations", "differs")
"""The shadow verdicts that are disagreements (`agree` and `error` are not)."""
_SHADOW_DIFF = f"shadow IN ({', '.join(repr(c) for c in SHADOW_CHANGES)})"
assert f"WHERE {_SHADOW_DIFF};" in _SCHEMA  # the partial index answers exactly this condition
"""The time grains of the calls-by-tool and denials-by-stage summaries (table suffix: seconds)."""
_SUMMARIES = (
    *(
        f"""INSERT INTO tool_{grain} (t, tool, n)
        SELECT CAST(ts / {seconds} AS INTEGER), COALESCE(tool, ''), ? * COUNT(*) FROM calls
        WHERE {{where}} GROUP BY 1, 2
        ON CONFLICT (t, tool) DO UPDATE SET n = n + excluded.n"""
        for grain, seconds in GRAINS.items()
    ),
    *(
        f"""INSERT INTO denial_{grain} (t, stage, n)
        SELECT CAST(ts / {seconds} AS INTEGER), COALESCE(NULLIF(stage, ''), decision, ''), ? * COUNT(*) FROM calls
        WHERE {{where}} AND decision != 'allow' GROUP BY 1, 2
        ON CONFLICT (t, stage) DO UPDATE SET n = n + excluded.n"""
        for grain, seconds in GRAINS.items()
    ),
    """INSERT INTO slot_policy (slot, policy_version, decision, n, first_ts, last_ts)
    SELECT CAST(ts / 900 AS INTEGER), policy_version, COALESCE(decision, ''), ? * COUNT(*), MIN(ts), MAX(ts)
    FROM calls WHERE {where} AND policy_version IS NOT NULL AND policy_version != '' GROUP BY 1, 2, 3
    ON CONFLICT (slot, policy_version, decision) DO UPDATE SET n = n + excluded.n,
      first_ts = MIN(first_ts, excluded.first_ts), last_ts = MAX(last_ts, excluded.last_ts)""",
    """INSERT INTO hour_agent (hour, agent, calls, tokens, last_seq)
    SELECT CAST(ts / 3600 AS INTEGER), agent, ? * COUNT(*), 0, MAX(seq)
    FROM calls WHERE {where} AND agent IS NOT NULL GROUP BY 1, 2
    ON CONFLICT (hour, agent) DO UPDATE SET calls = calls + excluded.calls,
      last_seq = MAX(last_seq, excluded.last_seq)""",
    """INSERT INTO hour_reason (hour, reason, n)
    SELECT CAST(c.ts / 3600 AS INTEGER), j.value, ? * COUNT(*)
    FROM calls c, json_each(c.reasons) j WHERE {where} AND c.decision != 'allow' AND j.type = 'text' GROUP BY 1, 2
    ON CONFLICT (hour, reason) DO UPDATE SET n = n + excluded.n""",
)
# The shadow policy's verdicts, counted with the record that carried them: a refusal's with its decision
# (`{where}` over decisions), an allowed call's with its outcome (`{where}` over outcomes, shadow_late).
_SUMMARY_SHADOW = """INSERT INTO slot_shadow (slot, policy_version, shadow_version, change, n)
    SELECT CAST(ts / 900 AS INTEGER), COALESCE(policy_version, ''), COALESCE(shadow_version, ''), shadow, ? * COUNT(*)
    FROM calls WHERE {where} AND shadow IS NOT NULL GROUP BY 1, 2, 3, 4
    ON CONFLICT (slot, policy_version, shadow_version, change) DO UPDATE SET n = n + excluded.n"""
# Tokens arrive with the outcome, often after the decision's step: summed as outcomes enter (and leave).
_SUMMARY_TOKENS = """INSERT INTO hour_agent (hour, agent, calls, tokens, last_seq)
    SELECT CAST(ts / 3600 AS INTEGER), agent, 0, ? * SUM(COALESCE(tokens, 0)), 0
    FROM calls WHERE {where} AND agent IS NOT NULL GROUP BY 1, 2
    ON CONFLICT (hour, agent) DO UPDATE SET tokens = tokens + excluded.tokens"""
_FACETS = (
    "INSERT OR IGNORE INTO facets SELECT 'agent', agent FROM calls WHERE {where} AND agent IS NOT NULL GROUP BY 2",
    "INSERT OR IGNORE INTO facets SELECT 'tool', tool FROM calls WHERE {where} AND tool IS NOT NULL GROUP BY 2",
    "INSERT OR IGNORE INTO facets SELECT 'policy_version', policy_version FROM calls WHERE {where}"
    " AND policy_version IS NOT NULL GROUP BY 2",
    "INSERT OR IGNORE INTO facets SELECT 'group', grp FROM call_groups WHERE {where} GROUP BY 2",
)
_SUMMARY_TABLES = (*(f"{kind}_{g}" for kind in ("tool", "denial") for g in GRAINS), "slot_policy", "hour_agent",
                   "hour_reason", "slot_shadow")  # fmt: skip
_PRUNE_SUMMARIES = (
    *(f"DELETE FROM {kind}_{g} WHERE n = 0" for kind in ("tool", "denial") for g in GRAINS),
    "DELETE FROM slot_policy WHERE n = 0",
    "DELETE FROM hour_agent WHERE calls = 0 AND tokens = 0",
    "DELETE FROM hour_reason WHERE n = 0",
    "DELETE FROM slot_shadow WHERE n = 0",
)


def _summarise(conn: sqlite3.Connection, where: str, args: Sequence[Any], sign: int, *, tokens_where: str,
               tokens_args: Sequence[Any]) -> None:  # fmt: skip
    for sql in _SUMMARIES:
        conn.execute(sql.format(where=where), (sign, *args))
    conn.execute(_SUMMARY_TOKENS.format(where=tokens_where), (sign, *tokens_args))
    conn.execute(_SUMMARY_SHADOW.format(where=f"{where} AND shadow_late IS NULL"), (sign, *args))
    conn.execute(_SUMMARY_SHADOW.format(where=f"{tokens_where} AND shadow_late = 1"), (sign, *tokens_args))


# Column of the index for each equality filter of `AuditQuery` (and the console's own: group, stage).
_EQUAL = {
    "agent": "c.agent",
    "subject": "c.subject",
    "tool": "c.tool",
    "decision": "c.decision",
    "stage": "c.stage",
    "policy_version": "c.policy_version",
    "run_id": "c.run_id",
}
_OUTCOMES = {
    "ok": "c.is_error = 0",
    "error": "c.is_error = 1 AND c.interrupted IS NULL",
    "interrupted": "c.interrupted = 1",
    "unfinished": "c.outcome_seq IS NULL AND c.decision = 'allow'",
}
assert set(_OUTCOMES) == set(OUTCOMES)
_SHADOW_OF = """CASE WHEN json_type(record, '$.shadow') IS NULL THEN NULL
  WHEN json_extract(record, '$.shadow.error') IS NOT NULL THEN 'error'
  WHEN json_extract(record, '$.shadow.differs') THEN COALESCE(json_extract(record, '$.shadow.change'), 'differs')
  ELSE 'agree' END"""
"""A record's shadow verdict against the live decision (server/policy/shadow.py `compare`)."""
_PROJECT_DECISIONS = f"""
INSERT OR IGNORE INTO calls (seq, call_id, ts, action, agent, subject, tool, decision, stage, policy_version,
                             run_id, reasons, shadow, shadow_version)
SELECT seq, call_id, ts, json_extract(record, '$.action'), json_extract(record, '$.agent_id'),
       json_extract(record, '$.subject'), json_extract(record, '$.tool'), json_extract(record, '$.decision'),
       json_extract(record, '$.stage'), json_extract(record, '$.policy_version'), json_extract(record, '$.run_id'),
       json_extract(record, '$.reasons'), {_SHADOW_OF}, json_extract(record, '$.shadow.policy_version')
FROM audit.outbox WHERE seq > ? AND seq <= ? AND kind = 'decision'
"""
_PROJECT_GROUPS = """
INSERT OR IGNORE INTO call_groups (grp, seq)
SELECT g.value, o.seq FROM audit.outbox o, json_each(o.record, '$.groups') g
WHERE o.seq > ? AND o.seq <= ? AND o.kind = 'decision' AND g.type = 'text'
"""
_PROJECT_OUTCOMES = f"""
UPDATE calls SET outcome_seq = o.seq, is_error = o.is_error, interrupted = o.interrupted, flags = o.flags,
                 tokens = o.tokens, latency_ms = o.latency_ms,
                 shadow_late = CASE WHEN calls.shadow IS NULL AND o.shadow IS NOT NULL THEN 1 END,
                 shadow = COALESCE(calls.shadow, o.shadow), shadow_version = COALESCE(calls.shadow_version,
                 o.shadow_version)
FROM (SELECT seq, call_id, {_SHADOW_OF} AS shadow, json_extract(record, '$.shadow.policy_version') AS shadow_version,
             json_extract(record, '$.is_error') AS is_error,
             json_extract(record, '$.interrupted') AS interrupted, json_extract(record, '$.flags') AS flags,
             COALESCE(json_extract(record, '$.tokens_in'), 0) + COALESCE(json_extract(record, '$.tokens_out'), 0)
               AS tokens, json_extract(record, '$.latency_ms') AS latency_ms
      FROM audit.outbox WHERE seq > ? AND seq <= ? AND kind = 'outcome') AS o
WHERE calls.call_id = o.call_id
"""


def _epoch(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class IndexState:
    projected: int
    """The last outbox position the index has read."""
    head: int
    """The outbox's last position when it was asked."""
    calls: int

    @property
    def behind(self) -> int:
        return max(0, self.head - self.projected)


def where_clause(query: AuditQuery) -> tuple[str, list[Any]]:
    """The SQL condition (on `calls c`) for every filter of `query` that is set, and its arguments."""
    where: list[str] = []
    args: list[Any] = []
    for f in fields(query):
        value = getattr(query, f.name)
        if value is None or value == "":
            continue
        if f.name in _EQUAL:
            where.append(f"{_EQUAL[f.name]} = ?")
            args.append(value)
        elif f.name == "group":
            where.append("EXISTS (SELECT 1 FROM call_groups g WHERE g.grp = ? AND g.seq = c.seq)")
            args.append(value)
        elif f.name == "reason":
            where.append("c.reasons LIKE ?")
            args.append(f"%{value}%")
        elif f.name == "flag":
            where.append("c.flags LIKE ?")
            args.append(f"%{value}%")
        elif f.name == "since":
            where.append("c.ts >= ?")
            args.append(_epoch(value))
        elif f.name == "until":
            where.append("c.ts < ?")
            args.append(_epoch(value))
        elif f.name == "outcome":
            if value not in _OUTCOMES:
                raise ValueError(f"outcome must be one of {', '.join(_OUTCOMES)}")
            where.append(_OUTCOMES[value])
        elif f.name == "shadow_diff" and value is True:
            where.append(f"c.{_SHADOW_DIFF}")
        elif f.name not in ("limit", "offset") and value is not False:
            # a filter the index does not hold (e.g. shadow_diff) is refused, never silently dropped
            raise ValueError(f"the console index cannot filter by {f.name}")
    return (" AND ".join(where) or "1"), args


def _only_time(query: AuditQuery) -> bool:
    return all(
        getattr(query, f.name) in (None, "")
        for f in fields(query)
        if f.name not in ("since", "until", "limit", "offset")
    )


class ConsoleIndex:
    """Projects `audit_db` (opened read-only) into `path`. Every method runs on one worker thread.

    `refresh` reads at most `batch` outbox positions per step; queries run after it. A corrupt or
    foreign index file is replaced (it holds nothing the outbox does not)."""

    def __init__(self, path: Path, audit_db: Path, *, batch: int = 20_000) -> None:
        self.path = path
        self.audit_db = audit_db
        self.batch = batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-index")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._follower: asyncio.Task[None] | None = None
        self._last_used = 0.0

    # -- the connection ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(f"file:{self.path}", uri=True, isolation_level=None, check_same_thread=False)
        try:
            enable_wal(conn)
            if conn.execute("PRAGMA user_version").fetchone()[0] not in (0, _VERSION):
                raise sqlite3.DatabaseError("index of another version")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {_VERSION}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            log.warning("console_index_rebuilt", path=str(self.path), why=str(exc))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return self._connect()
        conn.execute("PRAGMA synchronous=OFF")  # rebuildable: a lost commit is re-read from the outbox
        conn.execute("ATTACH DATABASE ? AS audit", (f"file:{self.audit_db}?mode=ro",))
        self._conn = conn
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._locked, fn)

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._executor.submit(self._locked, fn).result()

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return fn(self._connect())

    def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()

        def shut(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            self.run_sync(shut)
        self._executor.shutdown(wait=True)

    # -- projection -------------------------------------------------------------------------------

    def _state(self, conn: sqlite3.Connection, name: str, default: int = 0) -> int:
        row = conn.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else default

    def _step(self, conn: sqlite3.Connection, limit: int) -> IndexState:
        """Read the next `limit` outbox positions (one transaction); follow retention and a replaced outbox."""
        try:
            head, first = conn.execute(
                # two subqueries: SQLite answers a lone MIN or MAX from the key, a pair by scanning
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM audit.outbox),"
                " (SELECT COALESCE(MIN(seq), 0) FROM audit.outbox)"
            ).fetchone()
        except sqlite3.OperationalError:  # no outbox yet (nothing audited): nothing to show
            return IndexState(0, 0, 0)
        projected = self._state(conn, "projected")
        count = self._state(conn, "calls")
        retired = bool(first and conn.execute("SELECT 1 FROM calls WHERE seq < ? LIMIT 1", (first,)).fetchone())
        if projected == head and not retired:
            return IndexState(projected, int(head), count)  # nothing new: no write transaction
        conn.execute("BEGIN")  # deferred: IMMEDIATE would lock the read-only outbox too
        try:
            if projected > head:  # the outbox was replaced (restored, or a new data directory)
                for table in ("calls", "call_groups", *_SUMMARY_TABLES, "facets"):
                    conn.execute(f"DELETE FROM {table}")
                projected = count = 0
            if retired:  # removed by retention: out of the summaries first, then out of the index
                _summarise(conn, "seq < ?", (first,), -1, tokens_where="seq < ? AND outcome_seq IS NOT NULL",
                           tokens_args=(first,))  # fmt: skip
                count -= conn.execute("DELETE FROM calls WHERE seq < ?", (first,)).rowcount
                conn.execute("DELETE FROM call_groups WHERE seq < ?", (first,))
                for sql in _PRUNE_SUMMARIES:
                    conn.execute(sql)
            upto = min(head, projected + limit)
            if upto > projected:
                span = (projected, upto)
                count += conn.execute(_PROJECT_DECISIONS, span).rowcount
                conn.execute(_PROJECT_GROUPS, span)
                conn.execute(_PROJECT_OUTCOMES, span)
                _summarise(conn, "seq > ? AND seq <= ?", span, 1,
                           tokens_where="outcome_seq > ? AND outcome_seq <= ?", tokens_args=span)  # fmt: skip
                for sql in _FACETS:
                    conn.execute(sql.format(where="seq > ? AND seq <= ?"), span)
                projected = upto
            conn.executemany(
                "INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", [("projected", projected), ("calls", count)]
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return IndexState(projected, int(head), count)

    def catch_up(self, conn: sqlite3.Connection, budget: int | None = None) -> IndexState:
        """Project until the index reaches the outbox head or `budget` positions were read."""
        left = budget if budget is not None else 2**62
        while True:
            state = self._step(conn, min(self.batch, left))
            left -= self.batch
            if state.behind == 0 or left <= 0:
                return state

    async def refresh(self, budget: int = 2_000) -> IndexState:
        """Catch up at most `budget` outbox positions now (a page never waits for a rebuild), and keep a
        follower reading the rest, a step at a time, while pages are being asked for (5 minutes)."""
        self._last_used = time.monotonic()
        state = await self.run(lambda c: self.catch_up(c, budget))
        if self._follower is None or self._follower.done():
            self._follower = asyncio.get_running_loop().create_task(self._follow(), name="console-index")
        return state

    async def _follow(self) -> None:
        started, reported = time.monotonic(), False
        while time.monotonic() - self._last_used < _FOLLOW_SECONDS:
            state = await self.run(lambda c: self.catch_up(c, _FOLLOW_STEP))  # pages' queries run between steps
            if state.behind == 0:
                if not reported:
                    log.info("console_index_caught_up", calls=state.calls,
                             seconds=round(time.monotonic() - started, 2))  # fmt: skip
                    reported = True
                await asyncio.sleep(1.0)

    # -- queries ----------------------------------------------------------------------------------

    async def search(self, query: AuditQuery) -> list[dict[str, Any]]:
        """The calls matching `query`, newest first: the index's row for each (the fields a list shows)."""
        where, args = where_clause(query)
        limit = max(1, min(query.limit, 10_000))
        offset = min(max(0, query.offset), 2**62)
        sql = f"SELECT * FROM calls c WHERE {where} ORDER BY c.seq DESC LIMIT ? OFFSET ?"
        if (query.since or query.until) and _only_time(query):
            # The time index finds the positions and sorts only those (not whole rows): 127 ms -> 8 ms for
            # one day of 100,000 calls; with any other filter its own index leads.
            sql = (
                f"SELECT * FROM calls c WHERE c.seq IN (SELECT c.seq FROM calls c WHERE {where}"
                " ORDER BY c.seq DESC LIMIT ? OFFSET ?) ORDER BY c.seq DESC"
            )
        return await self.run(lambda c: _dicts(c.execute(sql, [*args, limit, offset])))

    async def run_calls(self, run_id: str, limit: int = 2_000) -> list[dict[str, Any]]:
        """A run's calls (tool calls and LLM requests), oldest first."""
        return await self.run(
            lambda c: _dicts(c.execute("SELECT * FROM calls c WHERE run_id = ? ORDER BY seq LIMIT ?", (run_id, limit)))
        )

    async def values(self, column: str, limit: int = 200) -> list[str]:
        """The distinct values seen in one filterable column (for the filter form's suggestions)."""
        if column not in ("agent", "tool", "policy_version", "group"):
            raise ValueError(f"no values for {column!r}")
        sql = "SELECT value FROM facets WHERE name = ? ORDER BY 1 LIMIT ?"
        return await self.run(lambda c: [str(r[0]) for r in c.execute(sql, (column, limit))])

    async def aggregate(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read of the index (`calls c`, `call_groups`) for the charts; `sql` is the console's own."""
        return await self.run(lambda c: [tuple(r) for r in c.execute(sql, list(args))])


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]
