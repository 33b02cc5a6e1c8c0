"""Tool isolation: processes that run a tool's code under OS-level confinement.

`Profile` says what a sandboxed process may see and do (network, paths, environment, limits);
`detect_mode` says which confinement this host gives (bubblewrap namespaces + seccomp, or resource
limits only where the kernel refuses namespaces); `launch` starts a process under a profile; `Worker`
talks to a long-lived sandboxed worker over its stdin/stdout, one request at a time.
"""

from __future__ import annotations

from server.sandbox.channel import Worker, WorkerDied, WorkerTimeout
from server.sandbox.launch import launch, wrap_command
from server.sandbox.mode import SandboxMode, detect_mode
from server.sandbox.profile import Limits, Profile, StdioProfile

__all__ = [
    "Limits",
    "Profile",
    "SandboxMode",
    "StdioProfile",
    "Worker",
    "WorkerDied",
    "WorkerTimeout",
    "detect_mode",
    "launch",
    "wrap_command",
]
