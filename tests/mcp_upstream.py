"""What the tests that put an MCP server behind the gateway share: a Python module run as a process and
stopped after, waiting for its port, the conformance fixture server (tests/fixtures/conformance_server.py:
the official SDK's server with tools, resources, a template, prompts and input rounds) as an upstream, a
copy of the demo policies with `data.upstreams` set, and the official client connected in either era."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server.settings import REPO_ROOT
from tests.gateway_process import GatewayProcess, free_port, stop


@contextmanager
def process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`python *args` from the repository root, output discarded; terminated (killed after 10 s) after."""
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        stop(proc)


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Until something accepts connections on 127.0.0.1:`port`; raises `RuntimeError` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def conformance_upstream(timeout: float = 60.0) -> Iterator[str]:
    """The conformance fixture server on a free loopback port; yields its /mcp URL."""
    port = free_port()
    with process("-m", "tests.fixtures.conformance_server", "--port", str(port)):
        wait_port(port, timeout)
        yield f"http://127.0.0.1:{port}/mcp"


def policies_with_upstreams(root: Path, upstreams: dict[str, Any]) -> Path:
    """A copy of the demo policies under `root` whose `data.upstreams` is `upstreams` (e.g. which
    relayed requests an upstream may not make); returns its directory."""
    policies = root / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    config = policies / "castellan" / "config" / "data.json"
    data = json.loads(config.read_text())
    data["upstreams"] = upstreams
    config.write_text(json.dumps(data))
    return policies


@asynccontextmanager
async def connect(gateway: GatewayProcess, token: str, mode: str) -> AsyncIterator[Client]:
    """The official Python client on the gateway's /mcp with `token`, in `mode` ("legacy" or a version)."""
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(gateway.mcp_url, http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        yield client
