"""Pipeline stages around the tool: `record` commits the decision before it runs, `audit` its outcome."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from server import after_response
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
    Otherwise committed before the response, a failure reported to the caller.

    Deferred, the record itself is built once the response is written (`after_response.later`: when
    the lean edge has sent it, else on the loop's next turn): its time is taken now, and the call is
    immutable. Built in order; one that cannot be built is logged and its call
    closed by a bare outcome that says so; `flush` builds what still waits (at shutdown). `then`: more
    work for that same turn, after the outcomes (the decision log's waiting lines)."""

    name = "audit"

    def __init__(
        self,
        outbox: Outbox,
        redactor: Redactor | None = None,
        *,
        deferred: bool = False,
        then: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._outbox = outbox
        self._redactor = redactor or Redactor()
        self._deferred = deferred
        self._then = tuple(then)
        self._pending: deque[tuple[Call, float]] = deque()
        self._pending_thread: int | None = None

    async def run(self, call: Call) -> Call:
        finished_at = time.time()
        if self._deferred:
            self._later(call, finished_at)
            return call
        record = outcome_record(call, finished_at, self._redactor)
        # committed before the response; a failure is reported to the caller (AfterInvoke)
        await self._outbox.write("outcome", call.call_id, record)
        if self._then:
            asyncio.get_running_loop().call_soon(self._run_then)
        return call

    def _later(self, call: Call, finished_at: float) -> None:
        pending = self._pending
        if pending and self._pending_thread != threading.get_ident():  # another loop's: not queued behind it
            self._write(call, finished_at)
            return
        pending.append((call, finished_at))
        if len(pending) == 1:  # the first waiting: one turn builds all that join it meanwhile
            self._pending_thread = threading.get_ident()
            after_response.later(self.flush)

    def flush(self) -> None:
        """Build and hand to the outbox the outcomes still waiting (the loop's next turn, and shutdown)."""
        pending = self._pending
        while pending:
            call, finished_at = pending[0]
            self._write(call, finished_at)
            pending.popleft()
        self._run_then()

    def _run_then(self) -> None:
        for then in self._then:
            try:
                then()
            except Exception:  # what it is for says so itself (the decision log counts its failures)
                log.exception("audit_then_failed")

    def _write(self, call: Call, finished_at: float) -> None:
        """Never raises: the call has been answered. A record that cannot be built is replaced by one
        that says so (its call is closed, not left open until a restart); one that cannot be queued
        is logged (one that cannot be committed is owed by the outbox)."""
        try:
            record = outcome_record(call, finished_at, self._redactor)
        except Exception as exc:
            log.exception("outcome_record_failed", call_id=call.call_id)
            record = _bare_outcome(call, finished_at, exc)
        try:
            self._outbox.write_later("outcome", call.call_id, record)
        except Exception as exc:
            log.error("audit_write_failed", call_id=call.call_id, kind="outcome", error=repr(exc))


def _bare_outcome(call: Call, finished_at: float, exc: Exception) -> dict[str, Any]:
    """The outcome of an answered call whose full record could not be built: that it ran, and why not."""
    return {
        "call_id": call.call_id,
        "is_error": call.output.is_error if call.output is not None else call.error is not None,
        "error": f"the outcome record could not be built ({type(exc).__name__})",
        "result_preview": None,
        "result_chars": 0,
        "tokens_in": call.tokens_in if isinstance(call.tokens_in, int) else 0,
        "tokens_out": call.tokens_out if isinstance(call.tokens_out, int) else 0,
        "latency_ms": round((finished_at - call.started_at) * 1000, 3),
        "timings_ms": {},
        "flags": [],
        "injection_markers": [],
        "detections": [],
    }


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
