"""Integration fixtures: a real gateway process on a loopback port, started once per session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from server.testing import GatewayProcess, run_gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with run_gateway(tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


def cli_token(gateway: GatewayProcess, agent: str, groups: str = "", *extra: str) -> str:
    """A token minted the way a user does it: `castellan token`, against the gateway's settings."""
    args = [sys.executable, "-m", "server", "token", "--agent", agent, "--groups", groups, *extra]
    done = subprocess.run(args, env=gateway.env(), capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()
