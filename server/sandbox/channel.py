"""A long-lived sandboxed worker spoken to in JSON lines over its stdin/stdout, one request at a time.

The worker's answers are parsed as JSON only (never unpickled): what runs in the sandbox cannot make
the gateway execute anything. An answer longer than the line limit kills the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Sequence
from typing import Any

from server.sandbox.launch import Launched, launch
from server.sandbox.mode import SandboxMode
from server.sandbox.profile import Profile


class WorkerDied(RuntimeError):
    """The worker exited (a resource limit, a crash, an oversized answer) before it answered."""


class WorkerTimeout(TimeoutError):
    """The worker did not answer in time; it has been killed."""


class Worker:
    def __init__(self, launched: Launched) -> None:
        self._launched = launched
        self.process = launched.process
        self.requests = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def start(
        cls,
        mode: SandboxMode,
        profile: Profile,
        argv: Sequence[str],
        *,
        max_answer_bytes: int = 8 << 20,
        ready_seconds: float = 60.0,
    ) -> Worker:
        """Starts the worker and waits for its first line, `{"ready": true}` (its imports done), so the
        time a request may take never includes the sandbox's start-up. Raises WorkerDied if it fails."""
        worker = cls(await launch(mode, profile, argv, limit=max_answer_bytes))
        assert worker.process.stdout is not None
        try:
            line = await asyncio.wait_for(worker.process.stdout.readline(), ready_seconds)
        except (TimeoutError, ValueError):
            await worker.kill()
            raise WorkerDied(f"the worker did not start within {ready_seconds:g} s") from None
        except BaseException:
            await asyncio.shield(worker.kill())  # cancelled while it started: leave no process behind
            raise
        if not line:
            code = await worker._reap()
            raise WorkerDied(f"the worker did not start: {_exit_reason(code)}")
        return worker

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def request(self, message: dict[str, Any], timeout: float, grace: float = 0.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Sends one request and waits for its answer. On timeout, sends `{"op": "interrupt"}` and waits
        `grace` seconds for the worker to give up cleanly before killing it (raising WorkerTimeout)."""
        async with self._lock:
            if not self.alive:
                raise WorkerDied("the worker is not running")
            self.requests += 1
            assert self.process.stdin is not None
            assert self.process.stdout is not None
            try:
                self.process.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
                await self.process.stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                await self.kill()
                raise WorkerDied(f"the worker stopped reading: {exc}") from None
            reading = asyncio.ensure_future(self.process.stdout.readline())
            done, _ = await asyncio.wait({reading}, timeout=timeout)
            if not done and grace > 0:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self.process.stdin.write(b'{"op":"interrupt"}\n')
                    await self.process.stdin.drain()
                done, _ = await asyncio.wait({reading}, timeout=grace)
                if done:
                    # it gave up cleanly: the answer is the interruption; the worker stays usable
                    with contextlib.suppress(Exception):
                        reading.result()
                    raise WorkerTimeout(f"no answer within {timeout:g} s (interrupted)")
            if not done:
                reading.cancel()
                await self.kill()
                raise WorkerTimeout(f"no answer within {timeout:g} s (killed)")
            try:
                line = reading.result()
            except (ValueError, asyncio.LimitOverrunError):
                await self.kill()
                raise WorkerDied("the answer exceeded its size limit") from None
            if not line:
                code = await self._reap()
                raise WorkerDied(_exit_reason(code))
            answer = json.loads(line)
            if not isinstance(answer, dict):
                await self.kill()
                raise WorkerDied("the worker sent something other than an answer")
            return answer

    async def _reap(self) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            await self.kill()
            code = self.process.returncode or -9
        self._launched.cleanup()
        return code

    async def kill(self) -> None:
        """Kills the worker and everything it started (its own process group), then reaps it."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.process.wait(), 5)
        self._launched.cleanup()

    async def close(self) -> None:
        if self.alive and self.process.stdin is not None:
            with contextlib.suppress(Exception):
                self.process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 2)
        await self.kill()


def _exit_reason(code: int) -> str:
    if code in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return f"stopped by a resource limit (exit {code})"
    return f"exited with status {code}"
