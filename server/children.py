"""Child processes that die with the gateway: a parent-death signal, so a SIGKILLed gateway leaves no orphans."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """The child's pre-exec step: ask the kernel for SIGKILL when the parent goes, then check that it has
    not already gone (the race between fork and prctl)."""

    libc = _libc() if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` as a child that the kernel kills when this process dies, however it dies.

    On Linux the parent-death signal fires when the *thread* that spawned the child exits, so spawn from
    the event loop's thread or another thread that lives as long as the child should (never from a
    short-lived worker). Elsewhere the child is started normally and may outlive a killed parent.
    """
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=_die_with_parent(os.getpid()),
    )
