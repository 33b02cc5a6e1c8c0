"""The pre-exec step of a sandboxed child: die with the gateway, own session, resource limits."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
import sys
from collections.abc import Callable

from server.sandbox.profile import Limits

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def preexec(limits: Limits, parent_pid: int, then: Callable[[], None] | None = None) -> Callable[[], None]:
    """Runs in the child between fork and exec (async-signal-safe enough: prctl and setrlimit only);
    `then` runs last (installing a seccomp filter, which needs no-new-privs set here first).

    The parent-death signal fires when the spawning *thread* exits: spawn from the event loop's thread.
    """
    libc = _libc()

    def step() -> None:
        with contextlib.suppress(OSError):  # already a session leader when the spawner asked for one
            os.setsid()  # its own process group: a kill reaches everything it started
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)
        if limits.memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        if limits.cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        if limits.open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        if limits.file_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if then is not None:
            then()

    return step
