"""The sandbox of a stdio upstream server: its `StdioProfile` turned into the command the gateway spawns."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

import structlog

from server.sandbox.launch import wrap_command
from server.sandbox.mode import detect_mode
from server.sandbox.profile import Limits, Profile, StdioProfile

log = structlog.get_logger("castellan.sandbox")
_ALWAYS = ("PATH", "LANG", "LC_ALL", "TZ")


def sandboxed_command(
    name: str, profile: StdioProfile, argv: Sequence[str], extra_env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start `argv` under `profile` (the environment is all it gets:
    PATH and the locale, the variables the profile names, and the upstream's own `env`)."""
    mode = detect_mode("auto")
    passed = {k: os.environ[k] for k in (*_ALWAYS, *profile.env) if k in os.environ}
    env = {**passed, **extra_env}
    executable = shutil.which(argv[0], path=env.get("PATH")) or argv[0]
    inner = Profile(
        read_only=tuple(profile.read_only),
        writable=tuple(profile.writable),
        env=env,
        network=profile.network,
        cwd=str(profile.cwd),
        limits=Limits(memory_bytes=profile.memory_mb << 20, processes=profile.processes),
    )
    if not mode.isolated:
        log.warning("upstream_sandbox_weaker", upstream=name, reason=mode.reason, detail=mode.describe())
    else:
        log.info("upstream_sandboxed", upstream=name, network=profile.network, detail=mode.describe())
    return wrap_command(mode, inner, [executable, *argv[1:]]), env
