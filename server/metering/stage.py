"""Pipeline stages 2 and 7, admit and charge: limits checked and tokens reserved before the call,
tokens counted and settled after; a call stopped in between releases its reservation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from server.call import Call
from server.content import rewritten
from server.identity import Identity
from server.metering.limits import resolve_limits
from server.metering.meter import Admission, Meter
from server.metering.tokens import TokenCounter
from server.settings import Limits, MeterSettings


def call_key(tool: str, arguments: object) -> str:
    """A digest of tool and arguments, so repeats of the same call can be counted."""
    canonical = json.dumps([tool, arguments], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class AdmitStage:
    """Admits the call against the identity's limits (agent, then groups, then defaults) and reserves
    its arguments' tokens plus `reserve_output_tokens` for the result."""

    name = "admit"

    def __init__(self, meter: Meter, settings: MeterSettings, counter: TokenCounter) -> None:
        self._meter = meter
        self._settings = settings
        self._counter = counter
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
            limits=self._limits_for(call.identity),
            estimate=tokens_in + self._settings.reserve_output_tokens,
            reservation=call.call_id,
            ttl=self._settings.reservation_ttl_seconds,
        )
        budget = await self._meter.admit(call.identity, call.run, admission)
        return replace(call, budget=budget, tokens_in=tokens_in)


class ChargeStage:
    """Counts the result's tokens and settles the reservation with what was used. A result larger than
    its reservation is truncated to fit (and says so): a token budget is never overrun."""

    name = "charge"

    def __init__(self, meter: Meter, counter: TokenCounter) -> None:
        self._meter = meter
        self._counter = counter

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        output = call.output
        tokens_out = self._counter.count_output(output) if output else 0
        budget = call.budget
        if budget is not None and budget.reserved_tokens and output is not None:
            room = max(0, budget.reserved_tokens - call.tokens_in)
            if tokens_out > room:
                note = f"\n[truncated: the result exceeded the {room} tokens reserved for it]"
                text = self._counter.truncate(output.text, max(0, room - self._counter.count(note))) + note
                output = rewritten(output, text)
                tokens_out = self._counter.count(text)
        reservation = budget.reservation if budget else call.call_id
        await self._meter.settle(call.identity, reservation, call.tokens_in + tokens_out)
        return replace(call, output=output, tokens_out=tokens_out)


class ReleaseReservation:
    """The pipeline's `on_stop` for metering: a call stopped after admission gives its tokens back."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter

    async def __call__(self, call: Call) -> None:
        if call.identity is not None and call.budget is not None and call.budget.reservation:
            try:
                await self._meter.release(call.identity, call.budget.reservation)
            except Exception:  # the reservation expires by itself; the call is already refused
                return
