"""Pipeline stage 4, policy: the Rego decision for the call, from the engine configured."""

from __future__ import annotations

from dataclasses import replace

from server.call import Call
from server.errors import Denied
from server.policy._input import build_input
from server.policy.decision_log import DecisionLog
from server.policy.engine import PolicyEngine
from server.policy.shadow import ShadowPolicy


class PolicyStage:
    """Asks the engine; a deny stops the call with the policy's reasons. Engine down means deny.
    Decisions go to the decision log when one is configured (list decisions do not: nothing runs;
    the line is built on the loop's next turn, while the call waits for its decision's commit),
    and to the shadow policy when one is: it decides the same document after the live decision, and
    what it said rides on the decision into the audit record, never into what the call gets."""

    name = "policy"

    def __init__(
        self, engine: PolicyEngine, decision_log: DecisionLog | None = None, shadow: ShadowPolicy | None = None
    ) -> None:
        self._engine = engine
        self._log = decision_log
        self._shadow = shadow

    async def run(self, call: Call) -> Call:
        document = build_input(call)
        decision = await self._engine.decide(document)
        shadowed = self._shadow is not None and call.action == "call"
        if self._log is not None and call.action != "list":
            # the log masks the document it is given in place: the shadow decides one of its own
            shadow_document = build_input(call) if shadowed else document
            self._log.emit_later(document, decision)  # written while the call is recorded: off its path
            document = shadow_document
        if not decision.allow:
            if shadowed:  # a refusal waits for it: its one record is written now
                assert self._shadow is not None
                shadow = await self._shadow.compare(document, decision, call.tool_name, call.call_id)
                decision = replace(decision, shadow=shadow)
            raise Denied(self.name, *(decision.reasons or ("denied by policy",)), decision=decision)
        if shadowed:  # an allowed call does not: it decides while the call is recorded and runs
            assert self._shadow is not None
            pending = self._shadow.begin(document, decision, call.tool_name, call.call_id)
            return call.evolve(decision=decision, shadow_pending=pending)
        return call.evolve(decision=decision)
