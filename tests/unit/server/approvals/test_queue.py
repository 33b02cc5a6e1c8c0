"""The approval queue's rules, on the real SQLite store: binding, one run per approval, the timeout,
and who may decide."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.approvals.errors import ApprovalConflict, ApprovalForbidden, ApprovalNotFound, ApprovalRefused
from server.approvals.queue import ApprovalQueue
from server.approvals.stage import ApprovalStage
from server.approvals.store import SqliteApprovals
from server.audit.redaction import Redactor
from server.call import Call, RunInfo
from server.policy.engine import Decision
from server.policy.obligations import ApprovalObligation
from server.settings import ApprovalSettings, AuditSettings
from tests.fakes.backends import make_call, make_identity

pytestmark = pytest.mark.anyio

ADMIN = make_identity(agent_id="ops-bot", subject="bob", groups=("admins",), scopes=("castellan:approve",))
ASK = {"groups": ["admins"], "reason": "resets the demo data"}


def waiting_call(**overrides: Any) -> Call:
    obligations = {"require_approval": overrides.pop("ask", ASK)}
    return make_call(decision=Decision(allow=True, obligations=obligations, policy_version="t"), **overrides)


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[ApprovalQueue]:
    q = ApprovalQueue(
        SqliteApprovals(tmp_path / "approvals.db"),
        ApprovalSettings(timeout_seconds=5, poll_interval_seconds=0.05),
        redactor=Redactor.from_settings(AuditSettings()),  # as the gateway redacts its audit log
    )
    yield q
    await q.close()


async def pending(queue: ApprovalQueue, count: int = 1) -> list[Any]:
    """The pending requests once `count` of them exist (the waiting call makes them)."""
    for _ in range(200):
        found = await queue.list()
        if len(found) >= count:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError("no approval request appeared")


async def test_an_approved_call_runs_with_who_approved_it_in_its_record(queue: ApprovalQueue) -> None:
    call = waiting_call()
    waiting = asyncio.create_task(ApprovalStage(queue).run(call))
    (request,) = await pending(queue)
    assert request.tool == "fake"
    assert request.caller.agent_id == "agent-1"
    assert "Why approval is needed: resets the demo data" in request.summary
    await queue.approve(request.id, ADMIN, "ok for the demo")
    done = await waiting
    assert done.approval is not None
    assert done.approval["status"] == "approved"
    assert done.approval["decided_by"]["subject"] == "bob"
    assert done.approval["comment"] == "ok for the demo"
    assert done.approval["summary"] == request.summary
    assert (await queue.get(request.id)).status == "used"  # type: ignore[union-attr]


async def test_a_call_without_the_obligation_passes_straight_through(queue: ApprovalQueue) -> None:
    call = make_call(decision=Decision(allow=True))
    assert await ApprovalStage(queue).run(call) is call
    assert await queue.list(None) == []


async def test_a_denial_refuses_the_call_with_the_comment(queue: ApprovalQueue) -> None:
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call()))
    (request,) = await pending(queue)
    await queue.deny(request.id, ADMIN, "not during business hours")
    with pytest.raises(ApprovalRefused, match="approval denied by bob: not during business hours") as refused:
        await waiting
    assert refused.value.stage == "approval"
    assert refused.value.approval is not None
    assert refused.value.approval["status"] == "denied"


async def test_nobody_deciding_in_time_denies(tmp_path: Path) -> None:
    queue = ApprovalQueue(
        SqliteApprovals(tmp_path / "a.db"), ApprovalSettings(timeout_seconds=0.3, poll_interval_seconds=0.05)
    )
    try:
        with pytest.raises(ApprovalRefused, match="no approver decided within") as refused:
            await ApprovalStage(queue).run(waiting_call())
        assert refused.value.approval is not None
        assert refused.value.approval["status"] == "expired"
        (request,) = await queue.list(("expired",))
        with pytest.raises(ApprovalConflict, match="expired, not pending"):
            await queue.approve(request.id, ADMIN)
    finally:
        await queue.close()


async def test_the_policy_may_ask_for_a_shorter_wait_never_a_longer_one(queue: ApprovalQueue) -> None:
    with pytest.raises(ApprovalRefused, match="no approver decided"):
        await ApprovalStage(queue).run(waiting_call(ask={**ASK, "timeout_seconds": 0.2}))
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(ask={**ASK, "timeout_seconds": 10_000})))
    (request,) = await pending(queue)
    assert request.expires_at - request.requested_at == pytest.approx(5)
    waiting.cancel()


@pytest.mark.parametrize(
    "approver",
    [
        make_identity(agent_id="other-bot", subject="alice", groups=("admins",)),  # the caller's own user
        make_identity(agent_id="agent-1", subject="carol", groups=("admins",)),  # the calling agent itself
        make_identity(agent_id="alice", subject="alice", groups=("admins",)),  # the user as an agent
    ],
)
async def test_an_approver_can_never_approve_their_own_call(queue: ApprovalQueue, approver: Any) -> None:
    waiting = asyncio.create_task(
        ApprovalStage(queue).run(waiting_call(identity=make_identity(groups=("analysts", "admins"))))
    )
    (request,) = await pending(queue)
    with pytest.raises(ApprovalForbidden, match="never approve their own call"):
        await queue.approve(request.id, approver)
    assert (await queue.get(request.id)).status == "pending"  # type: ignore[union-attr]
    waiting.cancel()


async def test_only_the_named_groups_may_decide(queue: ApprovalQueue) -> None:
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call()))
    (request,) = await pending(queue)
    with pytest.raises(ApprovalForbidden, match="only members of admins"):
        await queue.approve(request.id, make_identity(agent_id="x", subject="dave", groups=("analysts",)))
    with pytest.raises(ApprovalNotFound):
        await queue.approve("apr_nope", ADMIN)
    waiting.cancel()


async def test_an_approval_covers_its_own_arguments_only(queue: ApprovalQueue) -> None:
    first = asyncio.create_task(ApprovalStage(queue).run(waiting_call(arguments={"q": "one"})))
    second = asyncio.create_task(ApprovalStage(queue).run(waiting_call(arguments={"q": "two"})))
    requests = await pending(queue, 2)
    assert len({r.arguments_sha256 for r in requests}) == 2
    one = next(r for r in requests if r.arguments == {"q": "one"})
    await queue.approve(one.id, ADMIN)
    assert (await first).approval["id"] == one.id  # type: ignore[index]
    assert not second.done()
    second.cancel()


async def test_a_retry_of_the_same_call_waits_on_the_same_request_and_one_approval_runs_one_call(
    queue: ApprovalQueue,
) -> None:
    first = asyncio.create_task(ApprovalStage(queue).run(waiting_call(arguments={"q": "x", "n": 1})))
    (request,) = await pending(queue)
    retry = asyncio.create_task(ApprovalStage(queue).run(waiting_call(arguments={"n": 1, "q": "x"})))
    await asyncio.sleep(0.2)
    assert len(await queue.list()) == 1  # the same binding: tool, arguments, identity, run
    await queue.approve(request.id, ADMIN)
    results = await asyncio.gather(first, retry, return_exceptions=True)
    assert sum(isinstance(r, Call) for r in results) == 1
    (refused,) = [r for r in results if isinstance(r, ApprovalRefused)]
    assert "was used by another call" in str(refused)


async def test_another_run_or_identity_is_another_request(queue: ApprovalQueue) -> None:
    tasks = [
        asyncio.create_task(ApprovalStage(queue).run(waiting_call())),
        asyncio.create_task(ApprovalStage(queue).run(waiting_call(run=RunInfo(run_id="run-2")))),
        asyncio.create_task(ApprovalStage(queue).run(waiting_call(identity=make_identity(agent_id="agent-2")))),
    ]
    assert len(await pending(queue, 3)) == 3
    for task in tasks:
        task.cancel()


async def test_a_decision_made_through_another_process_is_seen_by_polling(tmp_path: Path) -> None:
    settings = ApprovalSettings(timeout_seconds=5, poll_interval_seconds=0.05)
    here = ApprovalQueue(SqliteApprovals(tmp_path / "shared.db"), settings)
    there = ApprovalQueue(SqliteApprovals(tmp_path / "shared.db"), settings)  # another replica's queue
    try:
        waiting = asyncio.create_task(ApprovalStage(here).run(waiting_call()))
        (request,) = await pending(there)
        await there.approve(request.id, ADMIN)
        assert (await waiting).approval["status"] == "approved"  # type: ignore[index]
    finally:
        await here.close()
        await there.close()


async def test_secrets_in_the_arguments_never_reach_the_queue(queue: ApprovalQueue) -> None:
    token = "ghp_" + "a1B2c3D4" * 5
    waiting = asyncio.create_task(
        ApprovalStage(queue).run(waiting_call(arguments={"q": f"use {token}", "password": "hunter22"}))
    )
    (request,) = await pending(queue)
    assert token not in request.summary
    assert token not in str(request.arguments)
    assert request.arguments["password"] == "[REDACTED]"
    waiting.cancel()


async def test_the_obligation_is_parsed_from_the_decision() -> None:
    from server.policy.obligations import approval_obligation

    ask = approval_obligation(Decision(allow=True, obligations={"require_approval": {**ASK, "timeout_seconds": 9}}))
    assert ask == ApprovalObligation(groups=("admins",), reason="resets the demo data", timeout_seconds=9.0)
    assert approval_obligation(Decision(allow=True)) is None


async def test_a_call_cancelled_while_it_waits_is_recorded_and_frees_its_reservation(queue: ApprovalQueue) -> None:
    from server.audit.stage import DenialRecorder
    from server.metrics import Metrics
    from server.pipeline import Pipeline
    from tests.fakes.backends import MemoryOutbox

    outbox = MemoryOutbox()
    released: list[str] = []

    async def release(call: Call) -> None:
        released.append(call.call_id)

    pipeline = Pipeline([ApprovalStage(queue)], Metrics(), on_stop=[release, DenialRecorder(outbox)])
    call = waiting_call()
    waiting = asyncio.create_task(pipeline.run(call))
    await pending(queue)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.05)
    (record,) = [r for kind, c, r in outbox.records if c == call.call_id and kind == "decision"]
    assert record["decision"] == "deny"
    assert record["stage"] == "approval"
    assert "cancelled before the tool ran" in record["reasons"][0]
    assert released == [call.call_id]
