"""Pipeline stage 4, policy: the Rego decision for the call, from the engine configured."""

from __future__ import annotations

from dataclasses import replace

from server.call import Call
from server.errors import Denied
from server.policy._input import build_input
from server.policy.engine import PolicyEngine


class PolicyStage:
    """Asks the engine; a deny stops the call with the policy's reasons. Engine down means deny."""

    name = "policy"

    def __init__(self, engine: PolicyEngine) -> None:
        self._engine = engine

    async def run(self, call: Call) -> Call:
        decision = await self._engine.decide(build_input(call))
        if not decision.allow:
            raise Denied(self.name, *(decision.reasons or ("denied by policy",)), decision=decision)
        return replace(call, decision=decision)
