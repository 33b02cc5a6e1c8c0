"""Audit housekeeping in the gateway: retention of shipped outbox records, and a warning before the
data directory's disk fills (log, `castellan_data_dir_free_bytes`, /readyz degraded)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import structlog

from server.audit.outbox import SqliteOutbox
from server.errors import BackendUnavailable
from server.metrics import Metrics
from server.settings import AuditSettings

log = structlog.get_logger("castellan.audit")


class AuditHousekeeping:
    """Runs every `retention_interval_seconds`: removes shipped records older than `retention_days`
    (never an unshipped one; verification keeps working through a `retained` checkpoint)."""

    def __init__(self, outbox: SqliteOutbox, settings: AuditSettings, data_dir: Path, metrics: Metrics) -> None:
        self._outbox = outbox
        self._settings = settings
        self._data_dir = data_dir
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._low = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="castellan-audit-housekeeping")

    async def _run(self) -> None:
        while True:
            try:
                await self.retain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retried at the next interval; nothing is removed unless verified
                log.error("audit_retention_failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(BackendUnavailable, OSError):
                await self.check()  # the low-disk warning in the log even when nobody asks /readyz
            await asyncio.sleep(self._settings.retention_interval_seconds)

    async def retain(self) -> int:
        days = self._settings.retention_days
        if not days:
            return 0
        total = 0
        while removed := await self._outbox.prune(days * 86_400):
            total += removed
            self._metrics.audit_records_retired.inc(removed)
            await asyncio.sleep(0.05)  # batches, so calls' writes get the database in between
        if total:
            await self._outbox.compact_checkpoints()
        return total

    def free_bytes(self) -> int:
        target = self._data_dir if self._data_dir.exists() else self._data_dir.parent
        return shutil.disk_usage(target).free

    async def check(self) -> None:
        """Raises `BackendUnavailable("degraded: ...")` below `min_free_disk_mb` (still serving)."""
        free = await asyncio.to_thread(self.free_bytes)
        self._metrics.data_free_bytes.set(free)
        limit = self._settings.min_free_disk_mb * 1024 * 1024
        low = bool(limit) and free < limit
        if low and not self._low:
            log.warning("data_disk_low", free_mb=free // 2**20, min_free_mb=self._settings.min_free_disk_mb,
                        data_dir=str(self._data_dir))  # fmt: skip
        self._low = low
        if low:
            raise BackendUnavailable(
                "audit",
                f"degraded: {free // 2**20} MB free on the data directory's disk "
                f"(warning below {self._settings.min_free_disk_mb} MB)",
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
