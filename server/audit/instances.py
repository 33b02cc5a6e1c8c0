"""Which gateway instance wrote an audit record, and whether it still runs: each writing instance
holds an exclusive `flock` on `<outbox stem>-instances/<id>.lock` for its lifetime; the kernel drops it
however the process ends, so a lock another process can take belongs to an instance that is gone."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class InstanceLocks:
    def __init__(self, directory: Path, instance: str) -> None:
        self.directory = directory
        self.instance = instance
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{self.instance}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def alive(self, instance: str | None) -> bool:
        """Whether `instance` still runs (records from before instances were named: no)."""
        if instance is None or instance == self.instance:
            return instance is not None
        path = self.directory / f"{instance}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        """At a clean shutdown. A crash leaves the file, and the next `alive` check removes it."""
        if self._fd is not None:
            (self.directory / f"{self.instance}.lock").unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
