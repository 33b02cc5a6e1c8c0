"""The audit shipper in its own process, supervised by the gateway.

Writing traces with MLflow's client is CPU-heavy Python (SQLAlchemy, protobuf): in the gateway's
process it holds the GIL and cut call throughput from 466 to 101 calls/s in a measured run. So by
default the gateway runs `castellan ship` as a child process on the same outbox, restarts it if it
dies, stops it on shutdown, and reports its lag from the outbox and its counters from a status file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from server.audit.keys import KEY_ENV
from server.audit.outbox import SqliteOutbox
from server.audit.shipper import publish_backlog, shipping_status
from server.children import spawn
from server.metrics import Metrics
from server.settings import AuditSettings

log = structlog.get_logger("castellan.audit.shipper")
SETTINGS_ENV = "CASTELLAN_SHIPPER_SETTINGS"
BUSY_EXIT = 3
"""`castellan ship`'s exit status when another shipper holds the outbox's lock."""


class ShipperProcess:
    def __init__(
        self, outbox: SqliteOutbox, settings: AuditSettings, data_dir: Path, audit_db: Path, metrics: Metrics
    ) -> None:
        # The chain key reaches the child in its environment (settings go as JSON, secrets masked).
        self._key = outbox.key.secret.decode()
        self._outbox = outbox
        self._settings = settings
        self._metrics = metrics
        self.status_file = data_dir / "shipper-status.json"
        self._child_settings = json.dumps(
            {"data_dir": str(data_dir), "audit_db": str(audit_db), "audit": settings.model_dump(mode="json")}
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._seen = {"shipped": 0, "failures": 0, "errors": 0}
        self._restarts = 0

    def _spawn(self) -> None:
        self.status_file.unlink(missing_ok=True)
        self._seen = {"shipped": 0, "failures": 0, "errors": 0}
        env = {**os.environ, SETTINGS_ENV: self._child_settings, KEY_ENV: self._key}
        self._process = spawn([sys.executable, "-m", "server", "ship"], env=env, stdin=None)
        log.info("audit_shipper_started", pid=self._process.pid, restarts=self._restarts)

    def start(self) -> None:
        self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="castellan-shipper-supervisor")

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            await asyncio.sleep(1.0)
            assert self._process is not None
            if self._process.poll() is not None:
                code = self._process.returncode
                why = "another shipper holds the outbox's lock" if code == BUSY_EXIT else None
                log.warning("audit_shipper_exited", code=code, reason=why, restart_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                self._restarts += 1
                try:
                    self._spawn()
                except Exception as exc:  # out of memory or processes: the next round tries again
                    log.error("audit_shipper_spawn_failed", error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
                    self._metrics.shipper_errors.labels("spawn").inc()
                continue
            backoff = 1.0
            with contextlib.suppress(Exception):
                await self._refresh_metrics()

    def _status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    async def _refresh_metrics(self) -> None:
        await publish_backlog(self._outbox, self._metrics)
        status = self._status()
        self._metrics.unfinished_calls.set(int(status.get("unfinished", 0)))
        counters = (
            ("shipped", self._metrics.shipped),
            ("failures", self._metrics.ship_failures),
            ("errors", self._metrics.shipper_errors.labels("process")),
        )
        for key, counter in counters:
            now = int(status.get(key, 0))
            if now > self._seen[key]:
                counter.inc(now - self._seen[key])
                self._seen[key] = now

    async def status(self) -> str:
        status = self._status()
        fault = status.get("fault")
        updated = float(status.get("updated") or 0)
        stale = self._settings.ship_interval_seconds + self._settings.ship_backoff_max_seconds + 30
        if updated and time.time() - updated > stale and not fault:
            fault = f"its status is {time.time() - updated:.0f} s old (cannot write it? stuck?)"
        return await shipping_status(self._outbox, self._settings, status.get("last_error"), fault)

    async def stop(self, drain_seconds: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # it ships what is ready for a few seconds, then exits
            try:
                await asyncio.to_thread(process.wait, drain_seconds + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
