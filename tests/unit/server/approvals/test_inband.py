"""In-band: the agent's user hears of the wait by elicitation (form, or URL with an approval page) and
may withdraw the call; they can never approve it (it is their own call)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from server.approvals.errors import ApprovalConflict, ApprovalForbidden, ApprovalRefused
from server.approvals.queue import ApprovalQueue
from server.approvals.stage import ApprovalStage
from server.approvals.store import SqliteApprovals
from server.call import Call
from server.policy.engine import Decision
from server.relay.channel import ELICIT, RelayFailed
from server.settings import ApprovalSettings
from tests.fakes.backends import make_call, make_identity

pytestmark = pytest.mark.anyio
ADMIN = make_identity(agent_id="ops-bot", subject="bob", groups=("admins",))


class FakeChannel:
    """An agent's client that declares elicitation (form, and URL when `urls`) and answers `action`,
    once `release` is set. Records what it was asked."""

    era = "session"

    def __init__(self, action: str | None = "accept", *, urls: bool = False, fails: bool = False) -> None:
        self.action, self.fails = action, fails
        self.asked: list[Mapping[str, Any]] = []
        self.release = asyncio.Event()
        self.capabilities = types.ClientCapabilities(
            elicitation=types.ElicitationCapability(
                form=types.FormElicitationCapability(), url=types.UrlElicitationCapability() if urls else None
            )
        )

    def supports(self, method: str) -> bool:
        return method == ELICIT

    async def request(self, method: str, params: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        self.asked.append(params)
        await self.release.wait()
        if self.fails:
            raise RelayFailed(-32603, "the client could not show it")
        return {"action": self.action, "content": {}}

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        return None


class FakeRelay:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel
        self.cancelled = False


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[ApprovalQueue]:
    settings = ApprovalSettings(
        timeout_seconds=5, poll_interval_seconds=0.05, approval_page_url="https://c.example/a/{id}"
    )
    q = ApprovalQueue(SqliteApprovals(tmp_path / "approvals.db"), settings)
    yield q
    await q.close()


def waiting_call(channel: FakeChannel) -> Call:
    decision = Decision(allow=True, obligations={"require_approval": {"groups": ["admins"], "reason": "irreversible"}})
    return make_call(decision=decision, relay=FakeRelay(channel))


async def asked(channel: FakeChannel) -> Mapping[str, Any]:
    for _ in range(200):
        if channel.asked:
            return channel.asked[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the user was not asked")


async def test_the_user_sees_the_call_summarised_and_declining_withdraws_it(queue: ApprovalQueue) -> None:
    channel = FakeChannel("decline")
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(channel)))
    params = await asked(channel)
    assert params["mode"] == "form"
    assert "asks to call fake" in params["message"]
    assert "approval by admins" in params["message"]
    channel.release.set()
    with pytest.raises(ApprovalRefused, match="withdrawn by the agent's user") as refused:
        await waiting
    in_band = refused.value.approval["in_band"]  # type: ignore[index]
    assert in_band["action"] == "decline"
    assert in_band["mode"] == "form"
    assert in_band["message"] == params["message"]
    assert in_band["answered_at"] is not None
    (request,) = await queue.list(("denied",))
    assert request.decided_by is not None
    assert request.decided_by.agent_id == "agent-1"
    assert request.summary in params["message"]  # the call summarised, arguments redacted as for approvers


async def test_the_summary_shown_to_the_user_is_redacted(queue: ApprovalQueue) -> None:
    channel = FakeChannel("cancel")
    call = make_call(
        arguments={"q": "hello", "password": "hunter2"},
        decision=Decision(allow=True, obligations={"require_approval": {"groups": ["admins"], "reason": "why"}}),
        relay=FakeRelay(channel),
    )
    waiting = asyncio.create_task(ApprovalStage(queue).run(call))
    params = await asked(channel)
    assert "hunter2" not in params["message"]
    assert "why" in params["message"]
    channel.release.set()
    with pytest.raises(ApprovalRefused, match="withdrawn by the agent's user \\(cancel\\)"):
        await waiting


async def test_only_the_calls_own_caller_may_withdraw_it(queue: ApprovalQueue) -> None:
    channel = FakeChannel("accept")
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(channel)))
    await asked(channel)
    (request,) = await queue.list()
    with pytest.raises(ApprovalForbidden, match="only the call's own caller"):
        await queue.withdraw(request.id, ADMIN, "not mine to withdraw")
    await queue.approve(request.id, ADMIN)
    with pytest.raises(ApprovalConflict):  # an approver decided first: their word stands
        await queue.withdraw(request.id, make_identity(), "too late")
    assert (await waiting).approval["status"] == "approved"  # type: ignore[index]


async def test_accepting_keeps_the_call_waiting_for_an_approver(queue: ApprovalQueue) -> None:
    channel = FakeChannel("accept")
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(channel)))
    await asked(channel)
    channel.release.set()
    await asyncio.sleep(0.2)
    assert not waiting.done()  # the user's accept is no approval: it is their own call
    (request,) = await queue.list()
    await queue.approve(request.id, ADMIN)
    done = await waiting
    assert done.approval["status"] == "approved"  # type: ignore[index]
    assert done.approval["in_band"]["action"] == "accept"  # type: ignore[index]


async def test_an_approval_out_of_band_ends_the_question_in_band(queue: ApprovalQueue) -> None:
    channel = FakeChannel("accept")  # never released: the user has not answered
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(channel)))
    await asked(channel)
    (request,) = await queue.list()
    await queue.approve(request.id, ADMIN)
    done = await waiting
    assert done.approval["in_band"]["action"] == "unanswered"  # type: ignore[index]


async def test_a_url_capable_client_is_pointed_at_the_approval_page(queue: ApprovalQueue) -> None:
    channel = FakeChannel("accept", urls=True)
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(channel)))
    params = await asked(channel)
    (request,) = await queue.list()
    assert params["mode"] == "url"
    assert params["url"] == f"https://c.example/a/{request.id}"
    assert params["elicitationId"] == request.id
    waiting.cancel()


async def test_a_client_that_fails_to_ask_leaves_the_call_waiting(queue: ApprovalQueue) -> None:
    channel = FakeChannel(fails=True)
    channel.release.set()
    waiting = asyncio.create_task(ApprovalStage(queue).run(waiting_call(channel)))
    await asked(channel)
    await asyncio.sleep(0.2)
    assert not waiting.done()
    waiting.cancel()


async def test_the_agent_cancelling_ends_the_wait(queue: ApprovalQueue) -> None:
    channel = FakeChannel()
    call = waiting_call(channel)
    waiting = asyncio.create_task(ApprovalStage(queue).run(call))
    await asked(channel)
    call.relay.cancelled = True  # type: ignore[union-attr]
    with pytest.raises(ApprovalRefused, match="the agent cancelled the call"):
        await asyncio.wait_for(waiting, 5)
