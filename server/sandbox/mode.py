"""Which confinement this host gives: bubblewrap namespaces (+ seccomp), or resource limits only."""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

from server.errors import ConfigError
from server.sandbox import seccomp

Requested = Literal["auto", "bubblewrap", "rlimits"]


@dataclass(frozen=True, slots=True)
class SandboxMode:
    """`bubblewrap`: no network, no filesystem but what a profile binds, no inherited environment, a
    private PID namespace, seccomp when libseccomp is present, plus the resource limits. `rlimits`: the
    weaker mode where the kernel refuses namespaces: resource limits, a clean environment, a private
    working directory and the seccomp filter (which then also refuses IP sockets to a profile without
    network); the process sees the host's files."""

    name: Literal["bubblewrap", "rlimits"]
    reason: str
    bwrap: str = ""
    seccomp: bool = False

    @property
    def isolated(self) -> bool:
        return self.name == "bubblewrap"

    def describe(self) -> str:
        if self.isolated:
            return f"bubblewrap ({self.bwrap}; seccomp {'on' if self.seccomp else 'off: ' + seccomp.unavailable()})"
        filtered = "seccomp on (no network, no child processes)" if not seccomp.unavailable() else "no seccomp"
        return f"rlimits, {filtered}; host files visible (weaker: {self.reason})"


# the same namespaces a sandbox gets (launch.bwrap_argv), around `true`
_PROBE: tuple[str, ...] = ("--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--die-with-parent")
_PROBE += ("--ro-bind", "/", "/", "--proc", "/proc", "--", "true")


def _probe(bwrap: str) -> str | None:
    """Why bubblewrap cannot make a sandbox here, or None when it can."""
    try:
        done = subprocess.run(
            [bwrap, *_PROBE],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not run: {exc}"
    if done.returncode != 0:
        return f"the kernel refused bubblewrap's namespaces: {done.stderr.decode(errors='replace').strip()[:200]}"
    return None


@functools.lru_cache(maxsize=4)
def detect_mode(requested: Requested = "auto") -> SandboxMode:
    """The mode to run tools in. `bubblewrap` when asked and unavailable raises ConfigError (fail closed);
    `auto` falls back to `rlimits` and says why; `rlimits` is taken as asked."""
    if requested == "rlimits":
        return SandboxMode("rlimits", "configured (tools.sandbox = 'rlimits')")
    bwrap = shutil.which("bwrap")
    why = "bubblewrap (bwrap) is not installed" if bwrap is None else _probe(bwrap)
    if why is None and bwrap is not None:
        return SandboxMode("bubblewrap", "namespaces available", bwrap=bwrap, seccomp=seccomp.unavailable() == "")
    if requested == "bubblewrap":
        raise ConfigError(f"tools.sandbox = 'bubblewrap' but {why}")
    return SandboxMode("rlimits", why or "unknown")
