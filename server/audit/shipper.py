"""The audit shipper: a background worker that ships outbox records to MLflow, one trace per call.

Never on the request path. Each batch is written synchronously (MLflow's own async queue drops traces
when full and swallows errors) in a worker thread, and its records are marked shipped only after
MLflow confirmed the write; while MLflow is down it backs off and retries, so records wait in the
durable outbox and nothing is lost. Shipping twice is harmless: trace ids derive from call ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from server.audit.mlflow_target import MlflowTarget
from server.audit.outbox import SqliteOutbox
from server.audit.traces import plan_trace
from server.metrics import Metrics
from server.settings import AuditSettings

log = structlog.get_logger("castellan.audit.shipper")


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
        self.failures = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="castellan-shipper")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.last_error: str | None = None
        self.shipped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="castellan-audit-shipper")

    def poke(self) -> None:
        """New records: look now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while not self._stopping:
            try:
                await loop.run_in_executor(self._executor, self._target.experiment_id)
                shipped = await self.ship_once()
                if self.last_error is not None:
                    log.info("audit_shipping_resumed", tracking_uri=self._target.tracking_uri)
                self.last_error, backoff = None, 0.0
                await self._update_backlog()
                if shipped:
                    self._write_status()
                    continue
                delay = self._settings.ship_interval_seconds
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = min(self._settings.ship_backoff_max_seconds, max(0.5, backoff * 2))
                if self.last_error is None:
                    log.warning("audit_shipping_failed", error=_describe(exc), retry_in=backoff)
                self.last_error = _describe(exc)
                self.failures += 1
                self._metrics.ship_failures.inc()
                delay = backoff
                await self._update_backlog()
            self._write_status()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def ship_once(self) -> int:
        """Ships one batch; returns how many calls it shipped (0: nothing ready)."""
        pending = await self._outbox.pending(self._settings.ship_batch, self._settings.ship_incomplete_after_seconds)
        if not pending:
            return 0
        plans = [plan_trace(p) for p in pending]
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._target.write, plans)
        self._metrics.ship_seconds.observe(time.perf_counter() - started)
        await self._outbox.mark_shipped([seq for p in pending for seq in p.seqs])
        self.shipped += len(pending)
        self._metrics.shipped.inc(len(pending))
        return len(pending)

    def _write_status(self) -> None:
        """For a supervising gateway (the shipper in its own process): what this shipper has done."""
        if self._status_file is None:
            return
        body = {
            "pid": os.getpid(),
            "shipped": self.shipped,
            "failures": self.failures,
            "last_error": self.last_error,
            "target": self._target.tracking_uri,
            "updated": time.time(),
        }
        temporary = self._status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(body))
        temporary.replace(self._status_file)

    async def _update_backlog(self) -> None:
        await publish_backlog(self._outbox, self._metrics)

    async def status(self) -> str:
        return await shipping_status(self._outbox, self._settings, self.last_error)

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
        if drain_seconds > 0 and self.last_error is None:
            deadline = time.monotonic() + drain_seconds
            with contextlib.suppress(Exception):
                while time.monotonic() < deadline:
                    remaining = max(0.1, deadline - time.monotonic())
                    if not await asyncio.wait_for(self.ship_once(), timeout=remaining):
                        break
        self._executor.shutdown(wait=False, cancel_futures=True)


async def publish_backlog(outbox: SqliteOutbox, metrics: Metrics) -> None:
    """The lag gauges in /metrics, from the outbox (whichever process ships)."""
    count, lag = await outbox.backlog()
    metrics.ship_backlog.set(count)
    metrics.ship_lag.set(lag)


async def shipping_status(outbox: SqliteOutbox, settings: AuditSettings, last_error: object) -> str:
    """ "ok", or what is wrong: for /readyz. Lag fails readiness only beyond `max_ship_lag_seconds`."""
    count, lag = await outbox.backlog()
    limit = settings.max_ship_lag_seconds
    if limit and lag > limit:
        return f"{count} audit records not shipped, oldest {lag:.0f} s (limit {limit:.0f} s): {last_error}"
    return "ok"


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
