"""Pipeline stages 2 and 7, admit and charge: limits checked before the call, tokens counted after."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from server.call import Call
from server.metering.meter import Meter
from server.metering.tokens import estimate_tokens
from server.settings import Limits


def call_key(tool: str, arguments: object) -> str:
    """A digest of tool and arguments, so repeats of the same call can be counted."""
    canonical = json.dumps([tool, arguments], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class AdmitStage:
    """Admits the call against rate, budget, run-length and repeat limits; records the budget seen."""

    name = "admit"

    def __init__(self, meter: Meter, limits: Limits) -> None:
        self._meter = meter
        self._limits = limits

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        budget = await self._meter.admit(
            call.identity, call.run, call_key(call.tool_name, call.arguments), self._limits
        )
        return replace(call, budget=budget)


class ChargeStage:
    """Counts the tokens of arguments and result, and charges them to the identity."""

    name = "charge"

    def __init__(self, meter: Meter) -> None:
        self._meter = meter

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        tokens_in = estimate_tokens(call.arguments)
        tokens_out = estimate_tokens(call.output.text) if call.output else 0
        await self._meter.charge(call.identity, tokens_in + tokens_out)
        return replace(call, tokens_in=tokens_in, tokens_out=tokens_out)
