"""Meter instances: which gateway process holds a reservation, and whether that process is still alive."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux `/proc/<pid>/stat` field 22), so a
    reused pid is not mistaken for the process that held it; empty where /proc is not available."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True, slots=True)
class Instance:
    """One meter in one gateway process: reservations it makes carry `id`.

    `host` and `boot` (the kernel's boot id) say whether another instance ran on this same machine
    since it booted; only then can its pid be checked directly. Elsewhere its heartbeat decides.
    """

    id: str
    host: str
    boot: str
    pid: int
    pid_start: str

    @classmethod
    def this_process(cls) -> Instance:
        pid = os.getpid()
        return cls(
            id=uuid.uuid4().hex,
            host=socket.gethostname(),
            boot=_read("/proc/sys/kernel/random/boot_id"),
            pid=pid,
            pid_start=_pid_start(pid),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Instance:
        return cls(
            id=str(value.get("id", "")),
            host=str(value.get("host", "")),
            boot=str(value.get("boot", "")),
            pid=int(value.get("pid", 0) or 0),
            pid_start=str(value.get("pid_start", "")),
        )

    def known_dead(self, observer: Instance) -> bool:
        """True when `observer` can see for itself that this instance's process is gone: same host
        and boot, and no process with its pid (and start time) exists. False when it cannot tell."""
        if not self.pid or self.host != observer.host or not self.boot or self.boot != observer.boot:
            return False
        if self.pid == observer.pid and self.pid_start == observer.pid_start:
            return False
        start = _pid_start(self.pid)
        if start:
            return bool(self.pid_start) and start != self.pid_start
        if Path("/proc/self/stat").exists():
            return True  # /proc works here and has no entry for the pid: the process is gone
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def dead(other: Instance, observer: Instance, heartbeat_age: float | None, timeout: float) -> bool:
    """An instance is dead when its heartbeat is older than `timeout` (or missing), or when the
    observer sees on the same machine that its process is gone (right after a restart)."""
    if other.id == observer.id:
        return False
    if heartbeat_age is None or heartbeat_age > timeout:
        return True
    with contextlib.suppress(OSError, ValueError):
        return other.known_dead(observer)
    return False
