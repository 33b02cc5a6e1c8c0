"""The system-call filter of a bubblewrap sandbox, compiled to BPF by libseccomp (via pyseccomp).

Default allow, with the calls a tool never needs refused (EPERM): tracing other processes, mounting,
namespaces, kernel keyrings, bpf, perf, io_uring, module loading, clock setting; and, when the profile
allows no child processes, fork/vfork and clone without CLONE_THREAD (threads still work).
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any

_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "iopl", "ioperm", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "acct", "quotactl", "syslog", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "fanotify_init", "lookup_dcookie", "mbind",
    "move_pages", "migrate_pages", "set_mempolicy", "vhangup", "personality", "fsopen", "fsmount",
    "fspick", "open_tree", "move_mount", "mount_setattr",
)  # fmt: skip
_CLONE_THREAD = 0x00010000


def _module() -> Any:
    import pyseccomp

    return pyseccomp


def unavailable() -> str:
    """Why no filter can be compiled here ("" when one can)."""
    try:
        _module().SyscallFilter(defaction=_module().ALLOW)
    except Exception as exc:  # ImportError, or libseccomp.so missing (OSError/AttributeError from ctypes)
        return f"libseccomp unavailable ({type(exc).__name__})"
    return ""


@functools.lru_cache(maxsize=2)
def _program(no_children: bool) -> bytes:
    sc = _module()
    rules = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in _DENIED:
        try:
            rules.add_rule(sc.ERRNO(errno.EPERM), name)
        except Exception:  # a call this kernel's table lacks
            continue
    if no_children:
        rules.add_rule(sc.ERRNO(errno.EPERM), "fork")
        rules.add_rule(sc.ERRNO(errno.EPERM), "vfork")
        rules.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # libc falls back to clone, checked below
        rules.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    fd = os.memfd_create("castellan-seccomp-build", 0)
    try:
        with os.fdopen(fd, "w+b", closefd=False) as sink:
            rules.export_bpf(sink)
            sink.flush()
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def filter_fd(no_children: bool) -> int:
    """A readable file descriptor holding the BPF program (for `bwrap --seccomp FD`); the caller closes it."""
    program = _program(no_children)
    fd = os.memfd_create("castellan-seccomp", 0)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
