"""What a sandboxed process may see and do: its filesystem view, network, environment and limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field


@dataclass(frozen=True, slots=True)
class Limits:
    """Operating-system limits on a sandboxed process (0: not limited).

    `memory_bytes` is its address space (RLIMIT_AS), `cpu_seconds` its CPU time (RLIMIT_CPU, SIGXCPU then
    SIGKILL), `processes` whether it may start others: 1 forbids fork/exec of children (seccomp), more is a
    pids cgroup where one can be made, `open_files` RLIMIT_NOFILE, `file_bytes` the largest file it may write.
    """

    memory_bytes: int = 0
    cpu_seconds: int = 0
    processes: int = 0
    open_files: int = 256
    file_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Profile:
    """A sandbox: nothing is visible or reachable unless listed here.

    `read_only` and `writable` paths are bound at the same place inside; `mounts` binds a host path
    (read-only) at another place inside; `env` is the whole environment (nothing is inherited);
    `network` keeps the host's network (else only a private loopback); `cwd` is inside the sandbox.
    """

    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    mounts: tuple[tuple[Path, str], ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    network: bool = False
    cwd: str = "/tmp"
    limits: Limits = field(default_factory=Limits)
    seccomp: bool = True
    """Install the system-call filter (no ptrace, mount, namespaces, kernel keyrings, bpf…)."""


class StdioProfile(BaseModel):
    """The sandbox a stdio upstream server runs in (`[upstreams.sandbox]`): least privilege by default."""

    model_config = {"extra": "forbid"}

    network: bool = False
    """Keep the host's network (for a server that calls an API); else only a private loopback."""
    read_only: list[Path] = Field(default_factory=list)
    """Host paths the server may read (its own code when outside the Python runtime, data it serves)."""
    writable: list[Path] = Field(default_factory=list)
    """Host paths the server may write (everything else is read-only or absent; /tmp is private)."""
    env: list[str] = Field(default_factory=list)
    """Names of the gateway's environment variables passed through (nothing else is, except PATH,
    LANG and the upstream's own `env`)."""
    memory_mb: int = Field(default=1024, ge=0)
    """Address-space ceiling of the server process (0: none)."""
    processes: int = Field(default=64, ge=0)
    """1: the server may not start other processes; more: a pids cgroup where one can be made."""
    cwd: Path = Path("/tmp")
    """Its working directory (inside the sandbox: /tmp, private, or one of the paths above)."""
