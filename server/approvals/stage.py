"""Pipeline stage `approval`, after policy and before the decision is recorded: a call whose decision
carries `require_approval` waits here for a human's approval; other calls pass straight through."""

from __future__ import annotations

from dataclasses import replace

from server.approvals.queue import ApprovalQueue
from server.call import Call
from server.policy.obligations import approval_obligation


class ApprovalStage:
    """Waits for the approval the decision asks for. Raises `ApprovalRefused` (denied, timed out) or
    `BackendUnavailable` (the queue cannot answer); either way the tool does not run and the refusal,
    with the approval's story, is recorded. An approved call goes on to `record`, so its decision row,
    committed before the tool runs, holds who approved it."""

    name = "approval"

    def __init__(self, queue: ApprovalQueue) -> None:
        self._queue = queue

    async def run(self, call: Call) -> Call:
        ask = approval_obligation(call.decision)
        if ask is None:
            return call
        return replace(call, approval=await self._queue.await_approval(call, ask))
