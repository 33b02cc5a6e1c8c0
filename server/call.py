"""The `Call`: everything the pipeline knows about one tool call, added to stage by stage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from server.errors import CastellanError
from server.identity import Identity
from server.policy.engine import Decision
from server.registry import Tool, ToolOutput

if TYPE_CHECKING:
    from server.relay.relay import Relay

Action = Literal["call", "list", "llm", "read", "subscribe", "prompt", "complete", "sample", "elicit", "roots", "task"]
"""What the agent (or, for sample/elicit/roots, an upstream during a call) asks for: docs/protocol.md."""


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What sent the call, as the client and the connection say: recorded for auditors. The client writes
    all of it but the address: it is a description, never an identity (that is the token's)."""

    name: str = ""
    version: str = ""
    user_agent: str = ""
    address: str = ""

    def as_record(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "user_agent": self.user_agent, "address": self.address}


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The agent run a call belongs to, as the caller declared it (`_meta`, headers or traceparent)."""

    run_id: str
    depth: int = 0
    traceparent: str | None = None
    ignored: tuple[str, ...] = ()
    """Declared values that were malformed and so not used, each with where it came from (for the log)."""


@dataclass(frozen=True, slots=True)
class Budget:
    """What the meter saw at admission: the input document's `budget` and `run` counters."""

    tokens_used: int = 0
    tokens_limit: int = 0
    calls_this_minute: int = 0
    run_calls: int = 0
    repeats: int = 0
    reservation: str = ""
    """The admission's reservation, settled by the charge stage or released if the call stops."""
    reserved_tokens: int = 0
    identical_calls: int = 0
    """This tool with these arguments by this identity in the sliding window, this call included
    (whatever run the caller declares)."""
    tool_calls: int = 0
    """Calls of this tool by this identity in the sliding window, this call included."""
    identical_calls_limit: int = 0
    identical_calls_window_seconds: int = 0
    tool_calls_limit: int = 0
    tool_calls_window_seconds: int = 0
    charged: bool = False
    """The charge stage settled the tokens (or queued the settle as owed): nothing left to release."""


@dataclass(frozen=True, slots=True)
class GrantCheck:
    """The privileges the call needs, split into those the identity holds and those it lacks."""

    has: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class Call:
    """One `tools/call` (or one `tools/list` entry) on its way through the pipeline. Frozen: stages replace.

    Not slotted, unlike the other records: a call is copied about 25 times on its way (a stage's
    result, then its timing), and with its fields in a `__dict__` a copy is one dict merge (`evolve`).
    """

    tool_name: str
    arguments: Mapping[str, Any]
    identity: Identity | None
    run: RunInfo
    action: Action = "call"
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    request_id: str = ""
    client: ClientInfo = field(default_factory=ClientInfo)
    started_at: float = field(default_factory=time.time)
    tool: Tool | None = None
    budget: Budget | None = None
    grants: GrantCheck | None = None
    decision: Decision | None = None
    output: ToolOutput | None = None
    detections: tuple[Mapping[str, Any], ...] = ()
    """Personal data and secrets found in the arguments (server/guardrails): `input.detections`."""
    result_detections: tuple[Mapping[str, Any], ...] = ()
    result_decision: Decision | None = None
    """The after-call decision on the result's detections (`input.action == "result"`), when asked."""
    shadow_pending: asyncio.Future[dict[str, Any]] | None = None
    """An allowed call's shadow decision, running beside the call (server/policy/shadow.py)."""
    shadow: Mapping[str, Any] | None = None
    """What the shadow policy said about an allowed call, for its outcome record (refusals: `decision.shadow`)."""
    tokens_in: int = 0
    tokens_out: int = 0
    error: CastellanError | None = None
    recorded: bool = False
    """The decision row is committed to the audit outbox (set by the record stage)."""
    approval: Mapping[str, Any] | None = None
    """The human approval the call waited for (server/approvals), as its audit record states it."""
    timings: tuple[tuple[str, float], ...] = ()
    relay: Relay | None = field(default=None, compare=False)
    """What an upstream may relay to this caller while the tool runs (None: nothing can be)."""

    def timed(self, stage: str, seconds: float) -> Call:
        """A copy with `(stage, seconds)` after the timings so far (the pipeline's, once per stage)."""
        changed = self.__dict__.copy()
        changed["timings"] = (*self.timings, (stage, seconds))
        new = _new(Call)
        _set(new, "__dict__", changed)
        return new

    def evolve(self, **changes: Any) -> Call:
        """A copy with `changes`, as `dataclasses.replace` makes it (no field has an `__init__` of its
        own to rerun) in one dict merge: ~20x cheaper than `replace` and ~15x than setting each field,
        and a call is copied once or twice per stage. Raises `TypeError` for a name that is not a field."""
        if not _CALL_FIELDS.issuperset(changes):
            raise TypeError(f"Call has no field(s) {sorted(set(changes) - _CALL_FIELDS)}")
        new = _new(Call)
        _set(new, "__dict__", {**self.__dict__, **changes})
        return new

    @property
    def allowed(self) -> bool:
        return self.error is None and self.decision is not None and self.decision.allow


_CALL_FIELDS = frozenset(f.name for f in fields(Call))
_new, _set = object.__new__, object.__setattr__
