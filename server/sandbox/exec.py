"""`python -m server.sandbox.exec SPEC`: become the sandboxed command described by SPEC (a JSON object
written by `launch.wrap_command`), for processes another library spawns (stdio upstream servers)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from server.sandbox import cgroup, seccomp
from server.sandbox.launch import bwrap_argv, weak_mode_filter
from server.sandbox.limits import preexec
from server.sandbox.mode import SandboxMode
from server.sandbox.profile import Limits, Profile


def main(raw: str) -> None:
    spec = json.loads(raw)
    mode = SandboxMode(**spec["mode"])
    p = spec["profile"]
    profile = Profile(
        read_only=tuple(Path(x) for x in p["read_only"]),
        writable=tuple(Path(x) for x in p["writable"]),
        env=p["env"],
        network=p["network"],
        cwd=p["cwd"],
        limits=Limits(**p["limits"]),
    )
    argv: list[str] = spec["argv"]
    if profile.limits.processes > 1:
        group = cgroup.pids_group(profile.limits.processes)
        if group is not None:
            cgroup.join(group)
    preexec(profile.limits, os.getppid(), weak_mode_filter(mode, profile))()
    if mode.isolated:
        fd = seccomp.filter_fd(profile.limits.processes == 1) if mode.seccomp else None
        if fd is not None:
            os.set_inheritable(fd, True)
        command = bwrap_argv(mode, profile, argv, fd)
    else:
        command = argv
        found = shutil.which(argv[0], path=profile.env.get("PATH"))
        command = [found or argv[0], *argv[1:]]
    sys.stdout.flush()
    os.execve(command[0], command, dict(profile.env))


if __name__ == "__main__":
    main(sys.argv[1])
