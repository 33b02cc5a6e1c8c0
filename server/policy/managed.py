"""A local OPA server that the gateway starts, watches and restarts: the `auto` engine's choice when
an `opa` binary is installed."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import structlog

from server.children import spawn
from server.errors import ConfigError

log = structlog.get_logger("castellan.policy")


def find_opa(configured: str) -> str | None:
    """The OPA binary: the configured path, else `opa` on PATH."""
    if configured:
        if not Path(configured).is_file():
            raise ConfigError(f"policy.opa_binary {configured} does not exist")
        return configured
    return shutil.which("opa")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedOpa:
    """One `opa run --server` on a loopback port, owned by this gateway. `revive()` restarts it when
    it has died (at most once every `min_restart` seconds); the engine then pushes the policy again."""

    def __init__(self, binary: str, *, min_restart: float = 1.0) -> None:
        self._binary = binary
        self._min_restart = min_restart
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = asyncio.Lock()

    def start(self, timeout: float = 15.0) -> None:
        self._spawn()
        self._wait_healthy(timeout)

    def _spawn(self) -> None:
        # on the calling thread: the child's parent-death signal is tied to the thread that spawned it
        self._process = spawn(
            [
                self._binary,
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "error",
                "--skip-version-check",
            ],
            stdout=subprocess.DEVNULL,
        )
        self._started_at = time.monotonic()

    def _wait_healthy(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(f"OPA ({self._binary}) exited with {self._process.returncode} at start-up")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=0.5):
                    log.info("opa_started", url=self.url, pid=self._process.pid)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"OPA did not become healthy within {timeout}s")

    async def revive(self) -> None:
        async with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            if time.monotonic() - self._started_at < self._min_restart:
                return
            log.warning("opa_restarting", url=self.url)
            try:
                self._spawn()
                await asyncio.to_thread(self._wait_healthy, 15.0)
            except ConfigError as exc:
                log.error("opa_restart_failed", error=str(exc))

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
