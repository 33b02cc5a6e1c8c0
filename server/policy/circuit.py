"""A circuit breaker for a remote policy engine: after repeated failures, deny fast instead of waiting."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("castellan.policy")


class Circuit:
    """`closed` (calls go to the engine) → `failures` consecutive failures → `open` (calls are denied at
    once, without touching the engine) → after `cooldown` seconds, `half_open`: the next call is the
    one trial let through; its success closes the circuit, its failure opens it again for `cooldown`.
    A dead or stalled engine therefore sees at most one call per `cooldown`, and callers wait at most
    one timeout each, not one per queued retry. Single-threaded (the event loop's)."""

    def __init__(self, failures: int = 3, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self.state = "closed"
        self.failures = 0
        self.opens = 0
        self.last_error = ""
        self._opened_at = 0.0

    def allow(self) -> bool:
        """May this call go to the engine? In `half_open`, only the first caller may."""
        if self.state == "closed":
            return True
        # A trial that never reported (its caller went away) is replaced after another cooldown.
        if self._clock() - self._opened_at >= self._cooldown:
            if self.state == "open":
                log.info("policy_engine_circuit_half_open", last_error=self.last_error)
            self.state, self._opened_at = "half_open", self._clock()
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0
        if self.state != "closed":
            self.state = "closed"
            log.info("policy_engine_circuit_closed")

    def failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        if self.state == "half_open" or (self.state == "closed" and self.failures >= self._threshold):
            self.state, self._opened_at = "open", self._clock()
            self.opens += 1
            log.warning("policy_engine_circuit_open", failures=self.failures, error=error, retry_in_s=self._cooldown)

    def describe(self) -> str:
        """For `/readyz` while not closed."""
        wait = max(0.0, self._cooldown - (self._clock() - self._opened_at))
        return f"circuit {self.state} after {self.failures} failures ({self.last_error}); next trial in {wait:.1f}s"
