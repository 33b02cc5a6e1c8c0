"""Pipeline stage 4, policy: the Rego decision for the call, from the engine configured."""

from __future__ import annotations

from dataclasses import replace

from server.call import Call
from server.errors import Denied
from server.policy._input import build_input
from server.policy.decision_log import DecisionLog
from server.policy.engine import PolicyEngine


class PolicyStage:
    """Asks the engine; a deny stops the call with the policy's reasons. Engine down means deny.
    Decisions go to the decision log when one is configured (list decisions do not: nothing runs)."""

    name = "policy"

    def __init__(self, engine: PolicyEngine, decision_log: DecisionLog | None = None) -> None:
        self._engine = engine
        self._log = decision_log

    async def run(self, call: Call) -> Call:
        document = build_input(call)
        decision = await self._engine.decide(document)
        if self._log is not None and call.action != "list":
            self._log.emit(document, decision)
        if not decision.allow:
            raise Denied(self.name, *(decision.reasons or ("denied by policy",)), decision=decision)
        return replace(call, decision=decision)
