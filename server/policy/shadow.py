"""Shadow policy: a candidate policy decided beside the live one on every call, never enforced.

The live decision is made first and is what the call gets; then the candidate decides the same
input document. For an allowed call that happens beside the call, off its response path (a task
started after the live decision, run while the decision row is written and the tool runs; the
`shadow` stage before the outcome write collects it): what it said goes into the outcome record.
A refused call waits for it, and it goes into the decision record. Either way each disagreement
goes into the log and `/metrics`. A shadow policy that fails, or is slower than its timeout, is
recorded as an error and changes nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from server.call import Call
from server.policy.engine import Decision, PolicyEngine

log = structlog.get_logger("castellan.policy.shadow")

ALLOW_TO_DENY = "allow_to_deny"
DENY_TO_ALLOW = "deny_to_allow"
OBLIGATIONS = "obligations"


def change(before: Decision, after: Decision) -> str | None:
    """How `after` differs from `before`: allow_to_deny, deny_to_allow, obligations (same verdict,
    other obligations) or None. Reasons alone are not a change (a reworded rule decides the same)."""
    if before.allow and not after.allow:
        return ALLOW_TO_DENY
    if not before.allow and after.allow:
        return DENY_TO_ALLOW
    if before.allow and _canonical(before.obligations) != _canonical(after.obligations):
        return OBLIGATIONS
    return None


def _canonical(value: Any) -> Any:
    """Obligations compared as values: a set that one engine returns in another order is the same."""
    if isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_canonical(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    return value


class ShadowPolicy:
    """Decides each input with the candidate `engine` after the live decision; never raises."""

    def __init__(self, engine: PolicyEngine, timeout_seconds: float, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self._timeout = timeout_seconds
        registry = registry or CollectorRegistry()
        self._decisions = Counter(
            "castellan_shadow_decisions",
            "Calls the shadow policy decided too, by result: agree, disagree or error (never enforced).",
            ["result"],
            registry=registry,
        )
        self._disagreements = Counter(
            "castellan_shadow_disagreements",
            "Calls the shadow policy would have decided otherwise, by change and tool.",
            ["change", "tool"],
            registry=registry,
        )
        self._running: set[asyncio.Task[dict[str, Any]]] = set()
        self._seconds = Histogram(
            "castellan_shadow_decision_seconds",
            "Time the shadow policy took to decide a call (after the live decision; beside an allowed call).",
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1),
            registry=registry,
        )

    async def compare(self, document: Mapping[str, Any], live: Decision, tool: str, call_id: str) -> dict[str, Any]:
        """What the audit record keeps: the candidate's verdict, reasons, obligations and version,
        whether it differs from `live` and how (or the error that kept it from deciding)."""
        started = time.perf_counter()
        try:
            candidate = await asyncio.wait_for(self.engine.decide(document), self._timeout)
        except Exception as exc:  # the shadow never affects the call: any failure is only recorded
            self._decisions.labels("error").inc()
            self._seconds.observe(time.perf_counter() - started)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"[:300]
            log.warning("shadow_decision_failed", call_id=call_id, tool=tool, error=reason)
            return {"error": reason, "differs": False, "policy_version": self.engine.policy_version}
        self._seconds.observe(time.perf_counter() - started)
        how = change(live, candidate)
        self._decisions.labels("disagree" if how else "agree").inc()
        if how:
            self._disagreements.labels(how, tool).inc()
            log.info(
                "shadow_disagreement",
                call_id=call_id,
                tool=tool,
                change=how,
                live_reasons=list(live.reasons),
                shadow_reasons=list(candidate.reasons),
                shadow_policy_version=candidate.policy_version,
            )
        return {
            "allow": candidate.allow,
            "reasons": list(candidate.reasons),
            "obligations": dict(candidate.obligations),
            "policy_version": candidate.policy_version,
            "differs": how is not None,
            "change": how,
        }

    def begin(
        self, document: Mapping[str, Any], live: Decision, tool: str, call_id: str
    ) -> asyncio.Task[dict[str, Any]]:
        """`compare` started beside the caller (the log and the metrics see it even if nobody waits)."""
        task = asyncio.ensure_future(self.compare(document, live, tool, call_id))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await self.engine.close()


class ShadowStage:
    """Collects an allowed call's shadow decision (begun by the policy stage) for its outcome record.
    Waits at most the shadow timeout (the decision is usually done by now); never raises."""

    name = "shadow"

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds

    async def run(self, call: Call) -> Call:
        pending = call.shadow_pending
        if pending is None:
            return call
        try:
            shadow = await asyncio.wait_for(asyncio.shield(pending), self._timeout)
        except Exception as exc:  # compare never raises: this is the wait timing out, or a cancel
            shadow = {"error": f"not decided in time ({type(exc).__name__})", "differs": False}
        return replace(call, shadow=shadow, shadow_pending=None)
