"""The DuckDB worker processes that run `sql.query`, out of the gateway's process.

Each worker is sandboxed (`server.sandbox`): an address-space ceiling (RLIMIT_AS) on top of DuckDB's
own memory limit, a CPU-bounded thread count, spill only into its own temporary directory (bounded,
removed with the worker), and under bubblewrap no network and a read-only view of the Delta tables
and the Python runtime, nothing else of the host. A query past its timeout is interrupted, and its
worker killed if it does not stop; a worker that breaks a limit dies alone and is replaced. Workers
are shared fairly between agent identities (`FairShare`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.sandbox import Limits, Profile, SandboxMode, Worker, WorkerDied, WorkerTimeout
from server.sandbox.runtime import python_executable
from tools.fair_share import FairShare

_RUNNER = Path(__file__).with_name("_sql_worker.py")
RUNTIME_HEADROOM_MB = 1024
"""Address space a worker needs beyond DuckDB's memory limit: Python, DuckDB, Arrow and delta-rs mapped."""


@dataclass(frozen=True, slots=True)
class SqlLimits:
    workers: int = 2
    per_identity: int = 1
    timeout_seconds: float = 20.0
    memory_mb: int = 1024
    threads: int = 2
    temp_mb: int = 512
    interrupt_grace_seconds: float = 2.0


class QueryFailed(Exception):
    """The query did not produce a result; the message is for the agent."""


class SqlWorkers:
    def __init__(self, mode: SandboxMode, tables_root: Path, spill_root: Path, limits: SqlLimits) -> None:
        self.mode = mode
        self.limits = limits
        self._tables_root = tables_root
        self._spill_root = spill_root
        self._share = FairShare(limits.workers, limits.per_identity)
        self._idle: list[tuple[Worker, Path]] = []
        self._all: dict[Worker, Path] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _profile(self, spill: Path) -> Profile:
        read_only = (self._tables_root,) if self._tables_root.exists() else ()
        mounts = ((_RUNNER, "/sandbox/sql_worker.py"),)
        limits = Limits(
            memory_bytes=(self.limits.memory_mb + RUNTIME_HEADROOM_MB) << 20,
            processes=1,
            open_files=512,
            file_bytes=max(self.limits.temp_mb, 1) << 20,
        )
        # fewer, smaller allocator arenas and thread pools: the runtime's virtual reservations stay well
        # inside the address-space ceiling (measured: 2.7 GB virtual with defaults, 0.8 GB with these)
        threads = str(self.limits.threads)
        env = {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system", "TOKIO_WORKER_THREADS": threads}
        return Profile(read_only=read_only, writable=(spill,), mounts=mounts, env=env, limits=limits)

    def _argv(self, spill: Path) -> list[str]:
        config: dict[str, Any] = {"memory_limit": f"{self.limits.memory_mb}MB", "threads": self.limits.threads}
        if self.limits.temp_mb > 0:
            config |= {"temp_directory": str(spill), "max_temp_directory_size": f"{self.limits.temp_mb}MB"}
        else:
            config |= {"temp_directory": ""}
        runner = "/sandbox/sql_worker.py" if self.mode.isolated else str(_RUNNER)
        return [python_executable(), "-I", runner, json.dumps(config)]

    async def _start(self) -> tuple[Worker, Path]:
        self._spill_root.mkdir(parents=True, exist_ok=True)
        spill = Path(tempfile.mkdtemp(prefix="sql-", dir=self._spill_root))
        try:
            worker = await Worker.start(self.mode, self._profile(spill), self._argv(spill))
        except BaseException:
            shutil.rmtree(spill, ignore_errors=True)
            raise
        self._all[worker] = spill
        return worker, spill

    async def _retire(self, worker: Worker) -> None:
        await worker.kill()
        spill = self._all.pop(worker, None)
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.close()  # workers of another (closed) loop cannot be spoken to from this one
            self._loop = loop
            self._share = FairShare(self.limits.workers, self.limits.per_identity)

    async def query(
        self, who: str, sql: str, tables: Mapping[str, Path], max_rows: int, max_bytes: int
    ) -> dict[str, Any]:
        """Runs one checked query for identity `who`; raises QueryFailed with the reason."""
        self._check_loop()
        request = {
            "op": "query",
            "sql": sql,
            "tables": {alias: str(path) for alias, path in tables.items()},
            "max_rows": max_rows,
            "max_bytes": max_bytes,
        }
        timeout = self.limits.timeout_seconds
        async with self._share.slot(who):
            while self._idle and not self._idle[-1][0].alive:
                await self._retire(self._idle.pop()[0])
            try:
                worker, spill = self._idle.pop() if self._idle else await self._start()
            except (WorkerDied, OSError) as exc:
                raise QueryFailed(f"query not run: its SQL worker could not start ({exc})") from None
            try:
                answer = await worker.request(request, timeout, grace=self.limits.interrupt_grace_seconds)
            except WorkerTimeout:
                await self._recycle(worker, spill)
                raise QueryFailed(f"query timed out after {timeout:g} s") from None
            except WorkerDied as exc:
                await self._retire(worker)
                raise QueryFailed(
                    f"query stopped: its worker {exc} (memory limit {self.limits.memory_mb} MB)"
                ) from None
            except BaseException:
                # cancelled mid-query (the pipeline's own timeout): stop it, never hand a busy worker on
                await asyncio.shield(self._retire(worker))
                raise
            await self._recycle(worker, spill)
        if "error" in answer:
            raise QueryFailed(f"query failed: {answer['error']}")
        return answer

    async def _recycle(self, worker: Worker, spill: Path) -> None:
        if worker.alive:
            self._idle.append((worker, spill))
        else:
            await self._retire(worker)

    def close(self) -> None:
        """Kills every worker and removes their spill directories (synchronous, for shutdown)."""
        for worker, spill in list(self._all.items()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            shutil.rmtree(spill, ignore_errors=True)
        self._all.clear()
        self._idle.clear()

    async def aclose(self) -> None:
        for worker in list(self._all):
            await self._retire(worker)
        self._idle.clear()
