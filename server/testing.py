"""Test support: small fakes of the backends, builders with sensible defaults, and a real gateway process.

The fakes (`StaticPolicy`, `MemoryMeter`, `MemoryOutbox`) are for unit tests of stages and the
pipeline; integration tests use the real backends.
"""

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from server.call import Budget, Call, RunInfo
from server.errors import BackendUnavailable, Denied
from server.identity import Identity
from server.policy.engine import Decision
from server.registry import ToolOutput, ToolSpec


def make_identity(**overrides: Any) -> Identity:
    values: dict[str, Any] = {
        "agent_id": "agent-1",
        "subject": "alice",
        "issuer": "castellan-dev",
        "groups": ("analysts",),
        "scopes": (),
    }
    values.update(overrides)
    return Identity(**values)


@dataclass
class FakeTool:
    """A tool that returns `result` (or raises `error`), recording the arguments it got."""

    spec: ToolSpec = field(
        default_factory=lambda: ToolSpec(
            name="fake",
            description="a fake tool",
            securable="main.tools.fake",
            input_schema={"type": "object", "properties": {"q": {"type": "string"}}},
        )
    )
    result: ToolOutput = field(default_factory=lambda: ToolOutput(text="ok", structured={"ok": True}))
    error: BaseException | None = None
    calls: list[Mapping[str, Any]] = field(default_factory=list)

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        self.calls.append(arguments)
        if self.error is not None:
            raise self.error
        return self.result


def make_call(**overrides: Any) -> Call:
    """A call by `make_identity()` to a `FakeTool`, allowed so far; override any field."""
    values: dict[str, Any] = {
        "tool_name": "fake",
        "arguments": {"q": "hello"},
        "identity": make_identity(),
        "run": RunInfo(run_id="run-1"),
        "tool": FakeTool(),
    }
    values.update(overrides)
    return Call(**values)


def allowed(call: Call, **overrides: Any) -> Call:
    """`call` as it looks after the policy stage allowed it."""
    return replace(call, decision=Decision(allow=True, policy_version="test", engine="static"), **overrides)


class StaticPolicy:
    """A policy engine that always gives `decision` (or raises `BackendUnavailable` when `down`)."""

    name = "static"

    def __init__(self, decision: Decision | None = None, *, down: bool = False) -> None:
        self.decision = decision or Decision(allow=True, policy_version="static")
        self.down = down
        self.inputs: list[Mapping[str, Any]] = []

    @property
    def policy_version(self) -> str:
        return self.decision.policy_version

    async def decide(self, document: Mapping[str, Any]) -> Decision:
        self.inputs.append(document)
        if self.down:
            raise BackendUnavailable("policy", "policy engine unavailable")
        return self.decision

    async def load(self, bundle: Any) -> Any:
        from server.policy.engine import LoadReport

        return LoadReport(loaded=True, policy_version=self.decision.policy_version)

    async def check(self) -> None:
        if self.down:
            raise BackendUnavailable("policy", "policy engine unavailable")

    async def close(self) -> None:
        return None


class MemoryMeter:
    """Counts tokens in memory, with reservations, against `tokens_per_day` and `max_run_calls`;
    `down` makes it fail closed. For stage tests; the real meters have their own suites."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.calls: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.reserved: dict[str, tuple[str, int]] = {}

    async def admit(self, identity: Identity, run: RunInfo, admission: Any) -> Budget:
        if self.down:
            raise BackendUnavailable("admit", "meter store unavailable")
        limits = admission.limits
        used = self.tokens.get(identity.agent_id, 0)
        held = sum(t for agent, t in self.reserved.values() if agent == identity.agent_id)
        if limits.tokens_per_day and used + held + admission.estimate > limits.tokens_per_day:
            raise Denied("admit", f"token budget: {used} of {limits.tokens_per_day} tokens per day used")
        key = f"{identity.agent_id}:{run.run_id}"
        self.calls[key] = self.calls.get(key, 0) + 1
        self.reserved[admission.reservation] = (identity.agent_id, admission.estimate)
        return Budget(
            tokens_used=used,
            tokens_limit=limits.tokens_per_day,
            run_calls=self.calls[key],
            repeats=1,
            reservation=admission.reservation,
            reserved_tokens=admission.estimate,
        )

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> None:
        if self.down:
            raise BackendUnavailable("charge", "meter store unavailable")
        self.reserved.pop(reservation, None)
        self.tokens[identity.agent_id] = self.tokens.get(identity.agent_id, 0) + tokens

    async def release(self, identity: Identity, reservation: str) -> None:
        self.reserved.pop(reservation, None)

    async def usage(self, agent_id: str, limits: Any) -> Any:
        raise NotImplementedError

    async def start(self) -> None:
        return None

    async def check(self) -> None:
        if self.down:
            raise BackendUnavailable("admit", "meter store unavailable")

    async def close(self) -> None:
        return None


class MemoryOutbox:
    """Keeps audit records in a list: `records` holds (kind, call_id, record)."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    async def write(self, kind: Any, call_id: str, record: dict[str, Any]) -> None:
        if self.down:
            raise BackendUnavailable("audit", "audit log unavailable")
        self.records.append((kind, call_id, record))

    def write_later(self, kind: Any, call_id: str, record: dict[str, Any]) -> None:
        if not self.down:  # a real outbox owes it; here it is simply not recorded
            self.records.append((kind, call_id, record))

    def kinds(self, call_id: str) -> list[str]:
        return [k for k, c, _ in self.records if c == call_id]

    async def check(self) -> None:
        if self.down:
            raise BackendUnavailable("audit", "audit log unavailable")

    async def close(self) -> None:
        return None


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
