"""The meter contract: admit a call against the identity's limits (reserving its tokens), then settle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.call import Budget, RunInfo
from server.identity import Identity
from server.settings import Limits


@dataclass(frozen=True, slots=True)
class Admission:
    """What to admit: the call's repeat key (tool + canonical arguments), the tool, the limits that
    apply, and the tokens to reserve."""

    call_key: str
    limits: Limits
    estimate: int
    reservation: str
    ttl: float
    tool: str = ""


@dataclass(frozen=True, slots=True)
class WindowUsage:
    window: str
    used: int
    limit: int
    resets_in: int


@dataclass(frozen=True, slots=True)
class Usage:
    """An agent's consumption against its limits (for `castellan usage` and `/admin/usage`)."""

    agent_id: str
    calls: tuple[WindowUsage, ...]
    tokens: tuple[WindowUsage, ...]
    in_flight: int
    reserved_tokens: int
    limits: Limits = field(default_factory=Limits)


class Meter(Protocol):
    """Counts calls and tokens per agent, atomically: admission checks every limit and reserves the
    call's estimated tokens (an in-flight reservation, expiring after `ttl`) in one step, so concurrent
    calls can never together pass a limit; `settle` replaces the reservation with the tokens used;
    `release` drops it for a call that stopped before running.

    `admit` raises `Denied("admit", reason)` naming the limit, window, usage and `retry_after`, or
    `BackendUnavailable` when the store cannot answer (fail closed). It never admits on error.

    Each reservation carries the meter instance (one per gateway process) that made it. `start`
    releases what instances that are gone held (a crashed process's in-flight calls) and keeps this
    instance's heartbeat; `close` releases what this instance still holds.
    """

    async def start(self) -> None: ...

    async def admit(self, identity: Identity, run: RunInfo, admission: Admission) -> Budget: ...

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> None: ...

    async def release(self, identity: Identity, reservation: str) -> None: ...

    async def usage(self, agent_id: str, limits: Limits) -> Usage: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...
