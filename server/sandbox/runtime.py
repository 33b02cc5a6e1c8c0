"""The read-only view of the Python runtime (and the system libraries it links) a sandbox gets."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf", "/etc/passwd", "/etc/group")


@functools.lru_cache(maxsize=1)
def python_paths() -> tuple[Path, ...]:
    """The interpreter's prefixes (base and venv) and /usr: code only, never the gateway's data."""
    found = {Path("/usr")}
    for prefix in (sys.base_prefix, sys.prefix, sys.exec_prefix):
        found.add(Path(prefix).resolve())
    found.add(Path(sys.executable).resolve().parent.parent)
    # drop paths already under another one
    return tuple(sorted(p for p in found if not any(q != p and q in p.parents for q in found)))


def system_binds() -> list[str]:
    """bubblewrap arguments for /bin, /lib… (symlinks kept as symlinks) and a few /etc files."""
    args: list[str] = []
    for top in _TOP_LEVEL:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for name in _FILES:
        args += ["--ro-bind-try", name, name]
    return args


def python_executable() -> str:
    """The interpreter to run in the sandbox (the venv's, so its site-packages are found)."""
    return sys.executable
