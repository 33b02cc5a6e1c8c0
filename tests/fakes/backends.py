"""Small fakes of the backends and builders with sensible defaults, for unit tests of stages and the
pipeline (`StaticPolicy`, `MemoryMeter`, `MemoryOutbox`, `FakeTool`); integration tests use the real
backends. Kept out of the `server` package: no deployment carries them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
