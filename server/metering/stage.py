"""Pipeline stages 2 and 7, admit and charge: limits checked and tokens reserved before the call,
tokens counted and settled after; a call stopped in between releases its reservation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace

import structlog

from server.call import Call
from server.content import rewritten
from server.errors import AfterInvoke
from server.identity import Identity
from server.metering.limits import resolve_limits
from server.metering.meter import Admission, Meter
from server.metering.retry import MeterRetries
from server.metering.tokens import TokenCounter
from server.settings import Limits, MeterSettings

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode  # built once, not per call


def call_key(tool: str, arguments: object) -> str:
    """A digest of tool and arguments, so repeats of the same call can be counted."""
    canonical = _CANONICAL([tool, arguments])
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


log = structlog.get_logger("castellan.metering")


class AdmitStage:
    """Admits the call against the identity's limits (agent, then groups, then defaults) and reserves
    its arguments' tokens plus the most output it can produce: `reserve_output_tokens` for a tool
    result, or what `output_tokens(call)` says (the LLM route: choices x the completion cap)."""

    name = "admit"

    def __init__(
        self,
        meter: Meter,
        settings: MeterSettings,
        counter: TokenCounter,
        output_tokens: Callable[[Call], int] | None = None,
        ttl_seconds: float | None = None,
    ) -> None:
        self._meter = meter
        self._settings = settings
        self._counter = counter
        self._output_tokens = output_tokens or (lambda _call: settings.reserve_output_tokens)
        self._ttl = ttl_seconds if ttl_seconds is not None else settings.reservation_ttl_seconds
        self._limits: dict[tuple[str, tuple[str, ...]], Limits] = {}  # settings are fixed for the process

    def _limits_for(self, identity: Identity) -> Limits:
        key = (identity.agent_id, identity.groups)
        limits = self._limits.get(key)
        if limits is None:
            if len(self._limits) > 10_000:
                self._limits.clear()
            limits = self._limits[key] = resolve_limits(self._settings, identity)
        return limits

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        tokens_in = self._counter.count(dict(call.arguments))
        admission = Admission(
            call_key=call_key(call.tool_name, call.arguments),
            tool=call.tool_name,
            limits=self._limits_for(call.identity),
            estimate=tokens_in + self._output_tokens(call),
            reservation=call.call_id,
            ttl=self._ttl,
        )
        limits = admission.limits
        budget = await self._meter.admit(call.identity, call.run, admission)
        windows = (
            limits.max_identical_calls,
            limits.identical_calls_window_seconds,
            limits.max_calls_per_tool,
            limits.tool_calls_window_seconds,
        )
        # The meters of this package put the sliding-window limits on the budget (no copy per call);
        # one that leaves them out (a test's) gets them here.
        if windows != (
            budget.identical_calls_limit,
            budget.identical_calls_window_seconds,
            budget.tool_calls_limit,
            budget.tool_calls_window_seconds,
        ):
            budget = replace(
                budget,
                identical_calls_limit=windows[0],
                identical_calls_window_seconds=windows[1],
                tool_calls_limit=windows[2],
                tool_calls_window_seconds=windows[3],
            )
        return call.evolve(budget=budget, tokens_in=tokens_in)


class ChargeStage:
    """Counts the result's tokens and settles the reservation with what was used. A result larger than
    its reservation is truncated to fit (and says so): a token budget is never overrun.

    The tool has run, so a settle the store refuses (locked, full, down) does not refuse the call:
    the tokens are owed, queued in `retries` (the reservation stays held until they are charged),
    and the call carries an `AfterInvoke` error saying so, which the outcome record keeps; the agent
    still gets the result."""

    name = "charge"

    def __init__(self, meter: Meter, counter: TokenCounter, retries: MeterRetries | None = None) -> None:
        self._meter = meter
        self._counter = counter
        self._retries = retries if retries is not None else MeterRetries(meter)

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        output = call.output
        tokens_out = self._counter.count_output(output) if output else 0
        budget = call.budget
        # tokens the agent's model spent on the upstream's sampling requests count against the budget too
        sampled = call.relay.sampled_tokens if call.relay is not None else 0
        if budget is not None and budget.reserved_tokens and output is not None:
            room = max(0, budget.reserved_tokens - call.tokens_in - sampled)
            if tokens_out > room:
                note = f"\n[truncated: the result exceeded the {room} tokens reserved for it]"
                text = self._counter.truncate(output.text, max(0, room - self._counter.count(note))) + note
                output = rewritten(output, text, has_output_schema=_has_output_schema(call))
                tokens_out = self._counter.count(text)
        reservation = budget.reservation if budget else call.call_id
        tokens = call.tokens_in + tokens_out + sampled
        error = call.error
        if not await self._retries.settle(call.identity, reservation, tokens):
            error = AfterInvoke(
                self.name,
                f"the tool ran, then charging its {tokens} tokens failed (the meter store did not answer): "
                "they are owed and retried in the background; its result is returned",
                withheld=False,
            )
        charged = replace(budget, charged=True) if budget is not None else None
        return call.evolve(output=output, tokens_out=tokens_out, budget=charged, error=error)


class ReleaseReservation:
    """The pipeline's `on_stop` for metering. A call stopped before its tool ran gives its reserved
    tokens back; one stopped after (its charge or outcome failed) is charged what it used. Either
    write, if the store refuses it, is queued in `retries` rather than dropped."""

    def __init__(self, meter: Meter, retries: MeterRetries | None = None, counter: TokenCounter | None = None) -> None:
        self._retries = retries if retries is not None else MeterRetries(meter)
        self._counter = counter

    async def __call__(self, call: Call) -> None:
        identity, budget = call.identity, call.budget
        if identity is None or budget is None or not budget.reservation or budget.charged:
            return
        try:
            if call.output is None:
                await self._retries.release(identity, budget.reservation)
                return
            tokens_out = call.tokens_out
            if not tokens_out and self._counter is not None:
                tokens_out = self._counter.count(call.output.text)
            await self._retries.settle(identity, budget.reservation, call.tokens_in + tokens_out)
        except Exception as exc:  # never let the meter change how a stopped call is reported
            log.error("meter_release_failed", call_id=call.call_id, error=repr(exc))


def _has_output_schema(call: Call) -> bool:
    return call.tool is not None and call.tool.spec.output_schema is not None
