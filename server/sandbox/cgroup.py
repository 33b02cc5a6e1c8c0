"""A pids cgroup per sandboxed process, where this host lets the gateway make one (best effort)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

_V1 = Path("/sys/fs/cgroup/pids")
_V2 = Path("/sys/fs/cgroup")


def _parent() -> Path | None:
    if (_V1 / "cgroup.procs").exists():
        return _V1 / "castellan"
    if (_V2 / "cgroup.controllers").exists():
        own = Path("/proc/self/cgroup").read_text().strip().splitlines()
        path = next((line.split("::", 1)[1] for line in own if line.startswith("0::")), None)
        return _V2 / path.lstrip("/") / "castellan" if path is not None else None
    return None


def _sweep(parent: Path) -> None:
    """Removes groups left empty a while ago (rmdir fails on busy ones; a group made in the last minute
    may be about to be joined by another gateway's child, so it stays)."""
    now = time.time()
    for group in parent.iterdir():
        with contextlib.suppress(OSError):
            if group.is_dir() and now - group.stat().st_mtime > 60:
                group.rmdir()


def pids_group(max_processes: int) -> Path | None:
    """A new cgroup with `pids.max`, or None when cgroups cannot be written here."""
    parent = _parent()
    if parent is None:
        return None
    try:
        parent.mkdir(exist_ok=True)
        _sweep(parent)
        if parent.parent == _V2 or (parent.parent / "cgroup.subtree_control").exists():
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("+pids")
        group = parent / uuid.uuid4().hex[:16]
        group.mkdir()
        (group / "pids.max").write_text(str(max_processes))
    except OSError:
        return None
    return group


def join(group: Path) -> None:
    """In the child before exec: move this process into `group`."""
    fd = os.open(group / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def remove(group: Path) -> None:
    """Kills whatever is still in the group (children that left the sandbox's session), then removes it."""
    for _ in range(10):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.01)  # the killed processes are still exiting
