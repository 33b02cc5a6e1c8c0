"""The audit chain's verification status for the console: the last signed checkpoint (cheap, read on
every page) and a full verification (the whole chain recomputed on its own read-only connection,
off the event loop and off the outbox's writer), remembered for the chain head it checked."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from server.audit.chain import Verification, legacy_heads, read_rows, verify_rows
from server.audit.checkpoints import Checkpoint
from server.audit.outbox import SqliteOutbox


@dataclass(frozen=True, slots=True)
class ChainStatus:
    verification: Verification
    checked_at: float
    seconds: float
    last_checkpoint: Checkpoint | None


class ChainChecker:
    def __init__(self, outbox: SqliteOutbox) -> None:
        self._outbox = outbox
        self._last: ChainStatus | None = None
        self._lock = asyncio.Lock()

    @property
    def last(self) -> ChainStatus | None:
        return self._last

    def last_checkpoint(self) -> Checkpoint | None:
        checkpoints, _ = self._outbox.checkpoints.read()
        valid = [cp for cp in checkpoints if cp.valid(self._outbox.key)]
        return max(valid, key=lambda cp: (cp.seq, cp.time), default=None)

    async def verify(self, max_age: float = 60.0) -> ChainStatus:
        """The latest verification if it is younger than `max_age` seconds, else a new one. One runs at a
        time (a request arriving meanwhile waits for it and shares its result): recomputing every MAC is
        seconds of CPU on a large log, so page views must not multiply it."""
        async with self._lock:
            if self._last is not None and time.time() - self._last.checked_at < max_age:
                return self._last
            status = await asyncio.to_thread(self._verify)
            self._last = status
            return status

    def _verify(self) -> ChainStatus:
        started = time.monotonic()
        checkpoints, unreadable = self._outbox.checkpoints.read()
        conn = sqlite3.connect(f"file:{Path(self._outbox.path)}?mode=ro", uri=True)
        try:
            result = verify_rows(read_rows(conn), self._outbox.key, checkpoints, unreadable, [], legacy_heads(conn))
        finally:
            conn.close()
        valid = [cp for cp in checkpoints if cp.valid(self._outbox.key)]
        last = max(valid, key=lambda cp: (cp.seq, cp.time), default=None)
        return ChainStatus(result, time.time(), time.monotonic() - started, last)
