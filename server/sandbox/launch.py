"""Starting a process under a `Profile`: bubblewrap's namespaces and seccomp, or resource limits only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.sandbox import cgroup, seccomp
from server.sandbox.limits import preexec
from server.sandbox.mode import SandboxMode
from server.sandbox.profile import Profile
from server.sandbox.runtime import python_paths, system_binds

NOBODY = "65534"


def bwrap_argv(mode: SandboxMode, profile: Profile, argv: Sequence[str], seccomp_fd: int | None) -> list[str]:
    """bubblewrap's command line: new user, PID, network, IPC, UTS and mount namespaces, a read-only view
    of the Python runtime plus what the profile binds, a private /tmp, capabilities dropped."""
    args = [mode.bwrap, "--unshare-all", "--unshare-user", "--uid", NOBODY, "--gid", NOBODY]
    if profile.network:
        args.append("--share-net")
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
    # the private /tmp first: a bind made before it under /tmp (a runtime or checkout that lives there, as
    # CI's clones may) would be hidden by it; bubblewrap makes the mount points for later binds inside it
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in python_paths():
        args += ["--ro-bind", str(path), str(path)]
    args += system_binds()
    for path in profile.read_only:
        args += ["--ro-bind", str(path), str(path)]
    for path in profile.writable:
        args += ["--bind", str(path), str(path)]
    for host, inside in profile.mounts:
        args += ["--ro-bind", str(host), inside]
    args += ["--chdir", profile.cwd]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return [*args, "--", *argv]


@dataclass
class Launched:
    """A started sandboxed process; `cleanup` frees what was made for it (cgroup, private directory)."""

    process: asyncio.subprocess.Process
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    group: Path | None = None
    """Its pids cgroup, when it has one."""

    def cleanup(self) -> None:
        for step in self.cleanups:
            with contextlib.suppress(Exception):
                step()
        self.cleanups.clear()


def _pieces(mode: SandboxMode, profile: Profile, argv: Sequence[str]) -> tuple[list[str], list[int], Path | None, str]:
    """The command, the fds to pass, the pids cgroup, and the host working directory."""
    fds: list[int] = []
    if mode.isolated:
        fd = None
        if profile.seccomp and mode.seccomp:
            fd = seccomp.filter_fd(no_children=profile.limits.processes == 1)
            fds.append(fd)
        command = bwrap_argv(mode, profile, argv, fd)
        cwd = "/"
    else:
        command = list(argv)
        cwd = tempfile.mkdtemp(prefix="castellan-sandbox-")
    group = cgroup.pids_group(profile.limits.processes) if profile.limits.processes > 1 else None
    return command, fds, group, cwd


async def launch(
    mode: SandboxMode,
    profile: Profile,
    argv: Sequence[str],
    *,
    stderr: int | None = asyncio.subprocess.DEVNULL,
    limit: int = 1 << 20,
) -> Launched:
    """Starts `argv` sandboxed with pipes on stdin/stdout. Spawn from the event loop's thread: the child
    gets SIGKILL when that thread's process dies, and bubblewrap's --die-with-parent takes the sandbox."""
    command, fds, group, cwd = _pieces(mode, profile, argv)
    base = preexec(profile.limits, os.getpid(), weak_mode_filter(mode, profile))

    def step() -> None:
        if group is not None:
            cgroup.join(group)
        base()

    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=dict(profile.env),
            cwd=cwd,
            pass_fds=fds,
            preexec_fn=step,
            limit=limit,
        )
    finally:
        for fd in fds:
            os.close(fd)
    launched = Launched(process, group=group)
    if group is not None:
        launched.cleanups.append(lambda: cgroup.remove(group))
    if not mode.isolated:
        launched.cleanups.append(lambda: shutil.rmtree(cwd, ignore_errors=True))
    return launched


def weak_mode_filter(mode: SandboxMode, profile: Profile) -> Callable[[], None] | None:
    """Without namespaces, the child installs the seccomp filter itself (and then it also refuses IPv4/IPv6
    sockets when the profile has no network); under bubblewrap, bubblewrap installs it."""
    if mode.isolated or not profile.seccomp or seccomp.unavailable():
        return None
    return seccomp.installer(seccomp.program(profile.limits.processes == 1, no_network=not profile.network))


def wrap_command(mode: SandboxMode, profile: Profile, argv: Sequence[str]) -> list[str]:
    """A command line that runs `argv` under `profile` when started by someone else's spawner (the MCP
    stdio client): `python -m server.sandbox.exec SPEC` applies the limits, then execs bubblewrap."""
    spec = {
        "mode": {"name": mode.name, "reason": mode.reason, "bwrap": mode.bwrap, "seccomp": mode.seccomp},
        "profile": {
            "read_only": [str(p) for p in profile.read_only],
            "writable": [str(p) for p in profile.writable],
            "env": dict(profile.env),
            "network": profile.network,
            "cwd": profile.cwd,
            "limits": {"memory_bytes": profile.limits.memory_bytes, "processes": profile.limits.processes},
        },
        "argv": list(argv),
    }
    return [sys.executable, "-m", "server.sandbox.exec", json.dumps(spec)]
