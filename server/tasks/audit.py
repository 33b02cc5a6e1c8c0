"""The audit trail of a task's life: its creation, its end (completed, failed, cancelled, expired) and a
cancel, each an audited act of its own (`action: "task"`) beside the governed call's own records."""

from __future__ import annotations

import time
from typing import Any

from server.audit.outbox import Outbox
from server.audit.records import decision_record, outcome_record
from server.audit.redaction import Redactor
from server.audit.traces import new_call_id
from server.call import Call, ClientInfo, RunInfo
from server.identity import Identity
from server.policy.engine import Decision
from server.registry import ToolOutput
from server.tasks.store import Task

CREATED, ENDED, CANCEL = "tasks/create", "tasks/end", "tasks/cancel"
"""The `tool` of each kind of record, as `castellan audit search --tool` finds it."""


class TaskAudit:
    """Writes a task's records to the audit outbox. `created` is committed before the caller learns
    of the task (raises `BackendUnavailable` when it cannot be: the call is then not started);
    the others are committed when they happen."""

    def __init__(self, outbox: Outbox, redactor: Redactor | None = None) -> None:
        self._outbox = outbox
        self._redactor = redactor or Redactor()

    async def created(self, task: Task, identity: Identity | None, run_id: str, client: ClientInfo) -> None:
        await self._write(CREATED, task, identity, run_id, client, f"task {task.task_id} created")

    async def ended(self, task: Task, identity: Identity | None, run_id: str, how: str | None = None) -> None:
        await self._write(ENDED, task, identity, run_id, ClientInfo(), f"task {task.task_id} {how or task.status}")

    async def cancelled(self, task: Task, identity: Identity | None, run_id: str, client: ClientInfo) -> None:
        await self._write(CANCEL, task, identity, run_id, client, f"task {task.task_id} cancelled by its caller")

    async def _write(
        self, kind: str, task: Task, identity: Identity | None, run_id: str, client: ClientInfo, text: str
    ) -> None:
        arguments: dict[str, Any] = {
            "task_id": task.task_id,
            "tool": task.tool,
            "call_id": task.call_id,
            "status": task.status,
            "ttl_ms": int(task.ttl_seconds * 1000),
        }
        failed = task.status == "failed"
        call = Call(
            tool_name=kind,
            arguments=arguments,
            identity=identity,
            run=RunInfo(run_id=run_id),
            action="task",
            call_id=new_call_id(),
            client=client,
            decision=Decision(allow=True, reasons=(text,)),
            output=ToolOutput(text=text, is_error=failed),
        )
        await self._outbox.write("decision", call.call_id, decision_record(call, self._redactor))
        await self._outbox.write("outcome", call.call_id, outcome_record(call, time.time(), self._redactor))
