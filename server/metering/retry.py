"""Meter writes that failed (a settle, a release) kept and retried until the store answers, not dropped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.errors import BackendUnavailable
from server.identity import Identity
from server.metering.meter import Meter

log = structlog.get_logger("castellan.metering")

Kind = Literal["settle", "release"]


@dataclass(frozen=True, slots=True)
class Pending:
    """One write the meter owes: settle `reservation` with `tokens`, or release it."""

    kind: Kind
    identity: Identity
    reservation: str
    tokens: int = 0
    since: float = 0.0


class MeterRetries:
    """A bounded queue of failed meter writes, retried with backoff by one background task.

    A settle that fails is owed: its reservation stays held (so concurrent calls still cannot pass
    the budget) until the retry charges the tokens. A release that fails is retried so a store that
    was briefly locked or full does not leave limits held until the reservations expire. When the
    queue is full the oldest write is dropped (its reservation still expires after
    `reservation_ttl_seconds`), counted and logged as an error. Metrics:
    `castellan_meter_retry_pending`, `castellan_meter_retries{kind,result}`.
    """

    def __init__(
        self,
        meter: Meter,
        registry: CollectorRegistry | None = None,
        *,
        capacity: int = 10_000,
        backoff_seconds: float = 0.2,
        backoff_max_seconds: float = 10.0,
    ) -> None:
        self._meter = meter
        self._queue: deque[Pending] = deque()
        self._capacity = capacity
        self._backoff = backoff_seconds
        self._backoff_max = backoff_max_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        registry = registry or CollectorRegistry()
        self._pending = Gauge(
            "castellan_meter_retry_pending",
            "Meter writes (settles, releases) that failed and wait to be retried.",
            registry=registry,
        )
        self._results = Counter(
            "castellan_meter_retries",
            "Meter writes handed to the retry queue, by kind and result (queued, done, dropped).",
            ["kind", "result"],
            registry=registry,
        )

    def written_behind(self, what: str, settles: int) -> None:
        """A write-behind meter's report: `settles` owed (its flush failed) or written once it worked,
        counted like the settles this queue retries."""
        self._results.labels("settle", "queued" if what == "owed" else "done").inc(settles)
        if what == "owed":
            log.warning("meter_settles_owed", settles=settles, reason="the meters file refused the write-behind")
        else:
            log.info("meter_settles_written", settles=settles)

    def __len__(self) -> int:
        return len(self._queue)

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> bool:
        """Settle now; on failure queue it. True when it was written now, False when it is owed."""
        return await self._attempt(Pending("settle", identity, reservation, tokens, time.time()))

    async def release(self, identity: Identity, reservation: str) -> bool:
        """Release now; on failure queue it. True when it was written now."""
        return await self._attempt(Pending("release", identity, reservation, 0, time.time()))

    async def _attempt(self, item: Pending) -> bool:
        try:
            await self._write(item)
            return True
        except BackendUnavailable as exc:
            self.defer(item, str(exc))
            return False

    def defer(self, item: Pending, error: str) -> None:
        if len(self._queue) >= self._capacity:
            dropped = self._queue.popleft()
            self._results.labels(dropped.kind, "dropped").inc()
            log.error(
                "meter_retry_dropped",
                kind=dropped.kind,
                agent_id=dropped.identity.agent_id,
                reservation=dropped.reservation,
                tokens=dropped.tokens,
                reason=f"retry queue full ({self._capacity}); the reservation expires by itself",
            )
        self._queue.append(item)
        self._pending.set(len(self._queue))
        self._results.labels(item.kind, "queued").inc()
        log.warning(
            "meter_write_queued",
            kind=item.kind,
            agent_id=item.identity.agent_id,
            reservation=item.reservation,
            tokens=item.tokens,
            error=error,
            pending=len(self._queue),
        )
        self._wake.set()
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: drain() or start() later
                self.start()

    async def _write(self, item: Pending) -> None:
        if item.kind == "settle":
            await self._meter.settle(item.identity, item.reservation, item.tokens)
        else:
            await self._meter.release(item.identity, item.reservation)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def drain(self) -> int:
        """Retry everything queued once, in order, stopping at the first failure; the number left."""
        while self._queue:
            item = self._queue[0]
            try:
                await self._write(item)
            except BackendUnavailable:
                break
            except Exception as exc:  # a bug must not wedge the queue: drop the one item, loudly
                log.exception("meter_retry_failed", kind=item.kind, reservation=item.reservation, error=repr(exc))
                self._queue.popleft()
                self._results.labels(item.kind, "dropped").inc()
                continue
            self._queue.popleft()
            self._results.labels(item.kind, "done").inc()
            log.info(
                "meter_write_retried",
                kind=item.kind,
                agent_id=item.identity.agent_id,
                reservation=item.reservation,
                tokens=item.tokens,
                after_s=round(time.time() - item.since, 3),
            )
        self._pending.set(len(self._queue))
        return len(self._queue)

    async def _loop(self) -> None:
        delay = self._backoff
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                delay = self._backoff
            await asyncio.sleep(delay)
            left = await self.drain()
            delay = min(self._backoff_max, delay * 2) if left else self._backoff

    async def close(self) -> None:
        """Stop retrying after one last attempt; what is still owed is logged (reservations expire)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = await self.drain()
        if left:
            log.error("meter_writes_lost_at_shutdown", pending=left, reason="the meter store did not answer")
