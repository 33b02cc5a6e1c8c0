"""The audit shipper: a background worker that ships outbox records to MLflow, one trace per call.

Never on the request path. Each batch is written synchronously (MLflow's own async queue drops traces
when full and swallows errors) in a worker thread, and its records are marked shipped only after
MLflow confirmed the write; while MLflow is down it backs off and retries, so records wait in the
durable outbox and nothing is lost. Shipping twice is harmless: trace ids derive from call ids.

It also ships the chain's signed checkpoints (a copy outside the machine), applies retention to the
local MLflow store, and reports calls that stay unfinished. It survives any exception: each is
logged, counted (`castellan_audit_shipper_errors`) and put in its status; only one shipper may run
per outbox (a lock held for its lifetime).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from server import heap
from server.audit.mlflow_target import BatchTooLarge, MlflowTarget
from server.audit.outbox import SqliteOutbox
from server.audit.traces import as_one_span, plan_trace
from server.metrics import Metrics
from server.settings import AuditSettings

log = structlog.get_logger("castellan.audit.shipper")
_CHECKPOINTS_SHIPPED = "checkpoints_shipped_through"
_GROW_AFTER = 4
_STATUS_REFRESH_SECONDS = 5.0
"""An unchanged status file is rewritten this often (the supervisor calls it stale after 30 s more
than the interval and the longest backoff)."""
"""Confirmed writes in a row after which a shrunk batch doubles back (up to `audit.ship_batch`)."""


class ShipperBusy(RuntimeError):
    """Another shipper holds this outbox's lock."""


class ShipperLock:
    """An exclusive `flock` on `<outbox>.ship.lock`, held for the shipper's lifetime (released by the
    kernel however the process ends), so two shippers never work the same outbox."""

    def __init__(self, outbox_path: Path) -> None:
        self.path = outbox_path.with_name(f"{outbox_path.name}.ship.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises `ShipperBusy` naming the holder's pid when another shipper runs."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ShipperBusy(
                f"another shipper (pid {holder}) is shipping {self.path.name.removesuffix('.ship.lock')}; "
                "only one may run per outbox"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Shipper:
    def __init__(
        self,
        outbox: SqliteOutbox,
        target: MlflowTarget,
        settings: AuditSettings,
        metrics: Metrics,
        status_file: Path | None = None,
    ) -> None:
        self._outbox = outbox
        self._target = target
        self._settings = settings
        self._metrics = metrics
        self._status_file = status_file
        self.lock = ShipperLock(outbox.path)
        self.failures = 0
        self.errors = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="castellan-shipper")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.last_error: str | None = None
        self.shipped = 0
        self.unfinished = 0
        self.fault: str | None = None
        """The last error outside shipping itself (status file, retention, ...): /readyz says degraded."""
        self._fault_at = 0.0
        self._next_housekeeping = 0.0
        self._checkpoint_position = (0, 0)
        self.batch = settings.ship_batch
        """How many calls the next write carries: halved when the server times out on a batch or
        refuses its size, doubled back after `_GROW_AFTER` confirmed writes."""
        self._confirmed_in_a_row = 0
        self._heap_settled = False
        self._status_state: tuple[object, ...] | None = None
        self._status_written = 0.0

    def _settle_heap(self) -> None:
        """In its own process (`castellan ship`, the one with a status file), once the first cycle has
        imported MLflow and opened the store: what is on the heap then (MLflow, SQLAlchemy, alembic,
        pydantic: hundreds of thousands of objects that live as long as the process) is moved out of
        the collector's sight (`gc.freeze`). Every older-generation collection traversed all of it
        while the shipper made a few tuples per span: 9% of the shipper's CPU (perf), ~0.1 ms a call.
        Not in the gateway's process (thread mode), whose heap is not the shipper's to freeze."""
        if self._heap_settled or self._status_file is None:
            return
        self._heap_settled = True
        heap.settle()

    def start(self) -> None:
        """Ships in the background, once it holds the outbox's shipping lock (waiting for it while
        another shipper holds it)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="castellan-audit-shipper")

    def poke(self) -> None:
        """New records: look now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        backoff = 0.0
        while not self._stopping:
            delay = self._settings.ship_interval_seconds
            try:
                if not self.lock.held:
                    try:
                        self.lock.acquire()
                    except ShipperBusy as exc:
                        self._error("lock", exc)
                        await asyncio.sleep(self._settings.ship_backoff_max_seconds)
                        continue
                shipped = await self._cycle()
                self._settle_heap()
                if self.last_error is not None:
                    log.info("audit_shipping_resumed", tracking_uri=self._target.tracking_uri)
                self.last_error, backoff = None, 0.0
                if shipped >= self.batch:  # a full batch: more may be waiting, so at once
                    delay = 0.0
                # Less than a full batch: caught up. Waiting the interval lets calls gather into one
                # write, where shipping each trickle at once paid a cycle's fixed cost (the
                # experiment check, checkpoints, backlog and status) for every few calls.
            except asyncio.CancelledError:
                raise
            except BatchTooLarge as exc:
                # A smaller batch at once; at one call a batch it is an outage like any other.
                self.last_error = _describe(exc)
                self.failures += 1
                self._metrics.ship_failures.inc()
                backoff = 0.0 if self.batch > 1 else min(self._settings.ship_backoff_max_seconds, max(0.5, backoff * 2))
                delay = backoff
            except Exception as exc:  # MLflow down, disk full, a bug: reported, retried, never fatal
                backoff = min(self._settings.ship_backoff_max_seconds, max(0.5, backoff * 2))
                if self.last_error is None:
                    log.warning("audit_shipping_failed", error=_describe(exc), retry_in=backoff)
                self.last_error = _describe(exc)
                self.failures += 1
                self._metrics.ship_failures.inc()
                delay = backoff
            if self._status_file is None:  # in its own process the supervisor publishes the lag itself
                await self._guarded("backlog", self._update_backlog())
            self._write_status(fresh_within=_STATUS_REFRESH_SECONDS)
            if self.fault is not None and time.monotonic() - self._fault_at > 60:
                log.info("audit_shipper_recovered", fault=self.fault)
                self.fault = None
            if delay:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _cycle(self) -> int:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._target.experiment_id)
        shipped = await self.ship_once()
        await self.ship_checkpoints()
        if time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self._settings.retention_interval_seconds
            await self._guarded("retention", self.retain())
            await self._guarded("unfinished", self._report_unfinished())
        return shipped

    async def _guarded(self, where: str, work: Any) -> None:
        """Housekeeping that must not stop shipping: a failure is logged, counted and kept in the status."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error(where, exc)

    def _error(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        self._metrics.shipper_errors.labels(where).inc()
        fault = f"{where}: {_describe(exc)}"
        if fault != self.fault:  # once per distinct fault, not every cycle of a full disk
            log.error("audit_shipper_error", where=where, error=_describe(exc))
        self.fault, self._fault_at = fault, time.monotonic()

    async def ship_once(self) -> int:
        """Ships one batch; returns how many calls it shipped (0: nothing ready)."""
        pending = await self._outbox.pending(self.batch)
        if not pending:
            return 0
        plans = [plan_trace(p) for p in pending]
        if self._settings.mlflow_spans == "call":
            plans = [as_one_span(p) for p in plans]
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._target.write, plans)
        except BatchTooLarge as exc:
            self._confirmed_in_a_row = 0
            if len(pending) > 1:
                self.batch = max(1, len(pending) // 2)
                log.warning("audit_ship_batch_shrunk", batch=self.batch, error=_describe(exc))
            raise
        self._metrics.ship_seconds.observe(time.perf_counter() - started)
        self._confirmed_in_a_row += 1
        if self.batch < self._settings.ship_batch and self._confirmed_in_a_row >= _GROW_AFTER:
            self.batch, self._confirmed_in_a_row = min(self._settings.ship_batch, self.batch * 2), 0
            log.info("audit_ship_batch_grown", batch=self.batch)
        await self._outbox.mark_shipped([seq for p in pending for seq in p.seqs])
        self.shipped += len(pending)
        self._metrics.shipped.inc(len(pending))
        return len(pending)

    async def ship_checkpoints(self) -> int:
        """Ships the signed checkpoints not shipped yet (a copy of the chain's heads off this disk)."""
        through = float(await self._outbox.ship_state(_CHECKPOINTS_SHIPPED) or 0)
        found, position = await asyncio.to_thread(self._outbox.checkpoints.read_new, self._checkpoint_position)
        new = [cp for cp in found if cp.time > through]
        if new:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._target.write_checkpoints, new)
            await self._outbox.set_ship_state(_CHECKPOINTS_SHIPPED, repr(max(cp.time for cp in new)))
            self._metrics.checkpoints_shipped.inc(len(new))
        self._checkpoint_position = position  # only once shipped: a failure reads them again
        return len(new)

    async def retain(self) -> int:
        """Retention of the local MLflow store (days and count); a tracking server keeps its own."""
        if not self._target.is_local:
            return 0
        days, cap = self._settings.local_mlflow_retention_days, self._settings.local_mlflow_max_traces
        if not days and not cap:
            return 0
        deleted = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._target.prune, days * 86_400 if days else None, cap or None
        )
        if deleted:
            log.info("mlflow_traces_retired", deleted=deleted, tracking_uri=self._target.tracking_uri)
            self._metrics.mlflow_traces_retired.inc(deleted)
        return deleted

    async def _report_unfinished(self) -> None:
        found = await self._outbox.unfinished(self._settings.ship_incomplete_after_seconds)
        self._metrics.unfinished_calls.set(found.count)
        if found.count > self.unfinished:
            log.warning(
                "audit_calls_unfinished",
                calls=found.count,
                oldest_seconds=round(found.oldest_seconds),
                call_ids=list(found.call_ids[:5]),
            )
        self.unfinished = found.count

    def _write_status(self, fresh_within: float = 0.0) -> None:
        """For a supervising gateway (the shipper in its own process): what this shipper has done.
        A failure here (disk full) is reported like any other and never stops shipping. Rewritten
        when something in it changed, else at most every `fresh_within` seconds (its age is how the
        supervisor tells a stuck shipper): a file written and renamed every cycle showed in the
        shipper's profile."""
        if self._status_file is None:
            return
        state = (self.shipped, self.failures, self.errors, self.unfinished, self.last_error, self.fault, self.batch)
        if state == self._status_state and time.monotonic() - self._status_written < fresh_within:
            return
        body = {
            "pid": os.getpid(),
            "shipped": self.shipped,
            "failures": self.failures,
            "errors": self.errors,
            "unfinished": self.unfinished,
            "last_error": self.last_error,
            "fault": self.fault,
            "target": self._target.tracking_uri,
            "batch": self.batch,
            "updated": time.time(),
        }
        try:
            temporary = self._status_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(body))
            temporary.replace(self._status_file)
            self._status_state, self._status_written = state, time.monotonic()
        except Exception as exc:
            self._error("status", exc)

    async def _update_backlog(self) -> None:
        await publish_backlog(self._outbox, self._metrics)

    async def status(self) -> str:
        return await shipping_status(self._outbox, self._settings, self.last_error, self.fault)

    async def lag(self) -> dict[str, object]:
        count, lag = await self._outbox.backlog()
        return {
            "unshipped": count,
            "lag_seconds": round(lag, 3),
            "shipped": self.shipped,
            "target": self._target.tracking_uri,
            "error": self.last_error,
        }

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Ships what is ready for up to `drain_seconds`, then stops; the rest waits in the outbox."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if drain_seconds > 0 and self.last_error is None and self.lock.held:
            deadline = time.monotonic() + drain_seconds
            with contextlib.suppress(Exception):
                while time.monotonic() < deadline:
                    remaining = max(0.1, deadline - time.monotonic())
                    if not await asyncio.wait_for(self.ship_once(), timeout=remaining):
                        break
                await asyncio.wait_for(self.ship_checkpoints(), timeout=max(0.1, deadline - time.monotonic()))
        self._write_status()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.lock.release()


async def publish_backlog(outbox: SqliteOutbox, metrics: Metrics) -> None:
    """The lag gauges in /metrics, from the outbox (whichever process ships)."""
    count, lag = await outbox.backlog()
    metrics.ship_backlog.set(count)
    metrics.ship_lag.set(lag)


async def shipping_status(
    outbox: SqliteOutbox, settings: AuditSettings, last_error: object, fault: object = None
) -> str:
    """ "ok", "degraded: ..." (the shipper works around a fault), or what is wrong: for /readyz. Lag
    fails readiness only beyond `max_ship_lag_seconds`; MLflow being down is lag, not a fault."""
    count, lag = await outbox.backlog()
    limit = settings.max_ship_lag_seconds
    if limit and lag > limit:
        return f"{count} audit records not shipped, oldest {lag:.0f} s (limit {limit:.0f} s): {last_error}"
    if fault:
        return f"degraded: shipper: {fault}"
    return "ok"


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
