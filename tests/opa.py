"""A real OPA server for tests: `opa run --server` on a free loopback port, stopped afterwards."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from server.policy._opa_binary import project_opa
from tests.gateway_process import free_port, stop


def opa_binary() -> str:
    binary = project_opa()
    if binary is None:
        pytest.fail("OPA is not installed: run scripts/install-test-deps (builds OPA v1.22.2 with Go)")
    return binary


@dataclass
class OpaProcess:
    port: int
    args: tuple[str, ...]
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop(self.process)

    def restart(self) -> None:
        self.stop()
        self.process = _spawn(self.port, self.args)
        _wait_healthy(self)


def _spawn(port: int, args: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            opa_binary(),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "error",
            "--skip-version-check",
            *args,
        ],
        stdout=subprocess.DEVNULL,
    )


def _wait_healthy(opa: OpaProcess, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{opa.url}/health", timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("OPA did not become healthy")


@contextmanager
def run_opa(*args: str) -> Iterator[OpaProcess]:
    port = free_port()
    opa = OpaProcess(port, tuple(args), _spawn(port, args))
    try:
        _wait_healthy(opa)
        yield opa
    finally:
        opa.stop()
