"""Pipeline stage `approval`, after policy and before the decision is recorded: a call whose decision
carries `require_approval` waits here for a human's approval; other calls pass straight through.

While it waits, an agent whose client declared elicitation is asked in band (`server.approvals.inband`):
the user sees what the call waits for and may withdraw it, never approve it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any

from server.approvals.errors import ApprovalActionError, ApprovalRefused
from server.approvals.inband import Question, can_ask
from server.approvals.queue import ApprovalQueue
from server.approvals.request import ApprovalRequest
from server.call import Call
from server.policy.obligations import ApprovalObligation, approval_obligation

WITHDRAWN = "withdrawn by the agent's user"


class ApprovalStage:
    """Waits for the approval the decision asks for. Raises `ApprovalRefused` (denied, timed out,
    withdrawn by the agent's user) or `BackendUnavailable` (the queue cannot answer); either way the tool
    does not run and the refusal, with the approval's story, is recorded. An approved call goes on to
    `record`, so its decision row, committed before the tool runs, holds who approved it."""

    name = "approval"
    waits = True  # on a human: the call is not counted as worked on meanwhile (server/in_flight)

    def __init__(self, queue: ApprovalQueue) -> None:
        self._queue = queue

    async def run(self, call: Call) -> Call:
        ask = approval_obligation(call.decision)
        if ask is None:
            return call
        channel = call.relay.channel if call.relay is not None else None
        if channel is None or not can_ask(channel):  # out of band only: the console, the CLI, the webhook
            return replace(call, approval=await self._queue.await_approval(call, ask))
        return replace(call, approval=await self._in_band(call, ask, channel))

    async def _in_band(self, call: Call, ask: ApprovalObligation, channel: Any) -> dict[str, Any]:
        """Wait for an approver as out of band, asking the user meanwhile. Their decline (or cancel)
        withdraws the call; their accept only keeps it waiting. What they were shown and did is the
        `in_band` member of the approval record, whichever way the wait ends."""
        questions: list[Question] = []

        def waiting(request: ApprovalRequest) -> None:
            questions.append(Question(channel, request, self._queue.approval_url(request.id)))

        wait = asyncio.ensure_future(self._queue.await_approval(call, ask, on_waiting=waiting))
        try:
            while not wait.done():
                pending: set[asyncio.Future[Any]] = {wait}
                if questions and not questions[0].task.done():
                    pending.add(questions[0].task)
                await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                if wait.done():
                    break
                if call.relay is not None and call.relay.cancelled:
                    raise self._cancelled(call, questions)
                if questions and questions[0].task.done() and questions[0].answer().withdraws:
                    await self._withdraw(call, questions[0])
                    await asyncio.wait({wait})  # the waiter reads the withdrawal (or an approver's earlier word)
            approval = wait.result()
        except ApprovalRefused as refused:
            if questions and refused.approval is not None:
                refused.approval["in_band"] = questions[0].answer().as_record()
            raise
        finally:
            for question in questions:
                question.stop()
            if not wait.done():
                wait.cancel()
                with contextlib.suppress(BaseException):
                    await wait
        if questions:
            approval["in_band"] = questions[0].answer().as_record()
        return approval

    async def _withdraw(self, call: Call, question: Question) -> None:
        assert call.identity is not None
        answer = question.answer()
        with contextlib.suppress(ApprovalActionError):  # an approver decided first (conflict): their word stands
            await self._queue.withdraw(question.request.id, call.identity, f"{WITHDRAWN} ({answer.action})")

    def _cancelled(self, call: Call, questions: list[Question]) -> ApprovalRefused:
        approval: dict[str, Any] | None = None
        if questions:
            request = questions[0].request
            now = time.time()
            approval = request.audit_view(now, now - request.requested_at)
            approval["in_band"] = questions[0].answer().as_record()
        return ApprovalRefused("the agent cancelled the call", decision=call.decision, approval=approval)
