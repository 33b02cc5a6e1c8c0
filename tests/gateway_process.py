"""A real gateway process for integration tests and benches: `castellan serve` on a free loopback
port with its own data directory, started, waited for (`/readyz`) and stopped (`run_gateway`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What a member of `analysts` may list with the demo settings (grants and the default policy).
ANALYST_TOOLS = [
    "clock.now",
    "demo.profile",
    "docs.search",
    "echo",
    "main.tools.apply_discount",
    "main.tools.days_between",
    "sql.query",
]


@dataclass
class GatewayProcess:
    """A real `castellan serve` on a loopback port, with its own data directory."""

    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    def env(self) -> dict[str, str]:
        """The environment the gateway runs with: for CLI commands that must see the same settings."""
        return {**os.environ, **gateway_env(self.data_dir, self.port, self.extra_env)}

    @property
    def issuer(self) -> str:
        """The dev issuer: the gateway's own base URL (unless the test configured another)."""
        return self.extra_env.get("CASTELLAN_AUTH__ISSUER") or self.base_url

    def token(self, agent: str, groups: Sequence[str] = (), **kwargs: Any) -> str:
        from server.auth.devkeys import mint_dev_token

        return mint_dev_token(
            self.data_dir, agent=agent, issuer=self.issuer, audience=self.mcp_url, groups=groups, **kwargs
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def castellan(*args: str, env: Mapping[str, str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`castellan ARGS` run as a user runs it, in `env` (the whole environment), its output captured;
    its exit status is the caller's to check."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli(
    gateway: GatewayProcess, *args: str, timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`castellan ARGS` as a user runs it beside the gateway (same settings and data directory), with
    `env` on top (a token, a setting of the user's own)."""
    return castellan(*args, env={**gateway.env(), **(env or {})}, timeout=timeout)


def cli_env(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI command over `data_dir` with no gateway beside it (gone, or never
    started): the test settings on the data directory, `extra` on top."""
    return {**os.environ, **gateway_env(data_dir, 0, extra)}


def gateway_env(data_dir: Path, port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        "CASTELLAN_DATA_DIR": str(data_dir),
        "CASTELLAN_SERVER__PORT": str(port),
        "CASTELLAN_LOG_FORMAT": "json",
        # Shipping to MLflow costs each gateway process seconds of start-up CPU (MLflow's import and
        # migrations); the tests of the shipper turn it on.
        "CASTELLAN_AUDIT__SHIP": "false",
        **(extra or {}),
    }


@contextlib.contextmanager
def run_gateway(
    data_dir: Path, extra_env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> Iterator[GatewayProcess]:
    """Start `python -m server serve` on a free port, wait until `/readyz` says ready, stop it after."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "gateway.log"
    env = {**os.environ, **gateway_env(data_dir, port, extra_env)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    gateway = GatewayProcess(
        data_dir=data_dir, port=port, process=process, log_path=log_path, extra_env=dict(extra_env or {})
    )
    try:
        _wait_ready(gateway, timeout)
        yield gateway
    finally:
        stop(process, timeout=15)


def stop(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a child process the tests and benches started: SIGTERM, up to `timeout` seconds for it to
    exit, then SIGKILL. Returns once it is reaped; a process that already exited is only reaped."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(gateway: GatewayProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n{gateway.log()}")
        try:
            with urllib.request.urlopen(f"{gateway.base_url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready after {timeout}s:\n{gateway.log()}")
