"""The system-call filter of a sandbox, compiled to BPF by libseccomp (via pyseccomp).

Default allow, with the calls a tool never needs refused (EPERM): tracing other processes, mounting,
namespaces, kernel keyrings, bpf, perf, io_uring, module loading, clock setting; when the profile
allows no child processes, fork/vfork and clone without CLONE_THREAD (threads still work); and, in
the weaker mode where there is no network namespace, IPv4/IPv6/packet sockets when the profile has no
network. bubblewrap installs it (`--seccomp FD`); in the weaker mode the child installs it itself
before exec (`install`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import socket
from collections.abc import Callable
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


@functools.lru_cache(maxsize=4)
def program(no_children: bool, no_network: bool = False) -> bytes:
    """The BPF program (struct sock_filter array) for these restrictions."""
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
    if no_network:
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_PACKET):
            rules.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, int(family)))
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
    fd = os.memfd_create("castellan-seccomp", 0)
    os.write(fd, program(no_children))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def installer(bpf: bytes) -> Callable[[], None]:
    """A pre-exec step that installs `bpf` on the calling process (no-new-privs must be set first).
    Everything is allocated here, in the parent; the child only calls prctl. It exits 126 if refused."""
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(len(bpf) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def install() -> None:
        _keep = buffer  # the program must outlive the fork
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            os._exit(126)
        del _keep

    return install
