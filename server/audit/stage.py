"""Pipeline stages around the tool: `record` commits the decision before it runs, `audit` its outcome."""

from __future__ import annotations

import time

import structlog

from server.audit.outbox import Outbox
from server.audit.records import decision_record, outcome_record
from server.audit.redaction import Redactor
from server.call import Call

log = structlog.get_logger("castellan.audit")


class RecordStage:
    """Commits the allow decision to the outbox. If that fails the call is denied: no unaudited call runs."""

    name = "record"

    def __init__(self, outbox: Outbox, redactor: Redactor | None = None) -> None:
        self._outbox = outbox
        self._redactor = redactor or Redactor()

    async def run(self, call: Call) -> Call:
        await self._outbox.write("decision", call.call_id, decision_record(call, self._redactor))
        return call.evolve(recorded=True)


class AuditStage:
    """Writes the outcome (result summary, tokens, latency, stage timings). `deferred`: off the response
    path, group-committed within the outbox's bounded interval (`audit.outcome_commit_seconds`); the
    decision is already durable, a crash inside the interval leaves the call without an outcome and
    the next start closes it as `interrupted`, and a write that fails is owed by the outbox, not lost.
    Otherwise committed before the response, a failure reported to the caller."""

    name = "audit"

    def __init__(self, outbox: Outbox, redactor: Redactor | None = None, *, deferred: bool = False) -> None:
        self._outbox = outbox
        self._redactor = redactor or Redactor()
        self._deferred = deferred

    async def run(self, call: Call) -> Call:
        record = outcome_record(call, time.time(), self._redactor)
        if self._deferred:
            self._outbox.write_later("outcome", call.call_id, record)
        else:  # committed before the response; a failure is reported to the caller (AfterInvoke)
            await self._outbox.write("outcome", call.call_id, record)
        return call


def _bare_decision(call: Call) -> dict[str, object]:
    """The decision row of a refused call whose full record could not be built: who, what, why."""
    error = call.error
    return {
        "call_id": call.call_id,
        "request_id": call.request_id,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(call.started_at)),
        "action": call.action,
        "agent_id": call.identity.agent_id if call.identity else None,
        "tool": call.tool_name[:256],
        "arguments": {"[unrecorded]": "the arguments could not be recorded"},
        "run_id": call.run.run_id,
        "decision": error.verdict if error else "error",
        "stage": error.stage if error else None,
        "code": error.code if error else None,
        "reasons": list(error.reasons) if error else [],
    }


class DenialRecorder:
    """Records a call the pipeline stopped: its decision row (deny or error). The pipeline's `on_stop`."""

    def __init__(self, outbox: Outbox, redactor: Redactor | None = None) -> None:
        self._outbox = outbox
        self._redactor = redactor or Redactor()

    async def __call__(self, call: Call) -> None:
        try:
            if call.recorded:
                # Stopped after the decision row was written: record how it ended instead.
                await self._outbox.write("outcome", call.call_id, outcome_record(call, time.time(), self._redactor))
            else:
                try:
                    record = decision_record(call, self._redactor)
                except Exception:  # whatever the call holds, its refusal is still recorded
                    log.exception("decision_record_failed", call_id=call.call_id)
                    record = _bare_decision(call)
                await self._outbox.write("decision", call.call_id, record)
        except Exception as exc:
            # The call is already refused; nothing is lost that was allowed. Say so loudly.
            log.error("audit_write_failed", call_id=call.call_id, error=str(exc))
