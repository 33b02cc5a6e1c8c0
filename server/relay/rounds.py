"""Calls waiting for the agent between the rounds of a 2026-07-28 multi-round-trip `tools/call`.

When a call's tool (or a pipeline stage) asks the agent something, the edge answers the agent with
an `input_required` result and the call waits here, its pipeline still running in its own task,
until the agent's retry carries the answers. The `requestState` the agent echoes names the round;
the SDK's `RequestStateBoundary` seals it (AES-256-GCM under the gateway's key, bound to the tool,
the arguments and the caller), so a tampered or foreign state never reaches this table, and the
table checks the caller once more. A round the agent does not come back to within
`ttl_seconds` is cancelled (its call is recorded as cancelled) and forgotten.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from server.relay.channel import InputRequiredChannel
from server.relay.relay import Relay

if TYPE_CHECKING:
    from server.call import Call

log = structlog.get_logger("castellan.relay")


@dataclass
class Round:
    """One call between rounds: its pipeline task, its relay and channel, whose call it is."""

    principal: str
    task: asyncio.Task[Call]
    relay: Relay
    channel: InputRequiredChannel
    expires_at: float = 0.0
    round_id: str = field(default_factory=lambda: secrets.token_urlsafe(16))


class Rounds:
    """The waiting calls of this process, by round id. Bounded: at most `max_waiting`; each lives at
    most `ttl_seconds` without the agent coming back."""

    def __init__(self, ttl_seconds: float, max_waiting: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.max_waiting = max_waiting
        self._waiting: dict[str, Round] = {}

    def park(self, entry: Round) -> str:
        self._expire()
        if len(self._waiting) >= self.max_waiting:
            raise OverflowError("too many calls waiting for their agents")
        entry.expires_at = time.monotonic() + self.ttl
        self._waiting[entry.round_id] = entry
        return entry.round_id

    def take(self, round_id: str, principal: str) -> Round | None:
        """The waiting call `round_id` if `principal` started it, removed from the table; else None."""
        self._expire()
        entry = self._waiting.get(round_id)
        if entry is None or entry.principal != principal:
            return None
        return self._waiting.pop(round_id)

    def _expire(self) -> None:
        now = time.monotonic()
        for round_id in [k for k, v in self._waiting.items() if v.expires_at <= now]:
            entry = self._waiting.pop(round_id)
            log.info("relay_round_expired", round_id=round_id)
            entry.relay.cancel()
            entry.channel.abandon()

    def close(self) -> None:
        for entry in self._waiting.values():
            entry.relay.cancel()
            entry.task.cancel()
        self._waiting.clear()
