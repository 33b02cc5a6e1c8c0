"""The approvals page: the pending queue with what each call would do; approve or deny with a comment,
as the signed-in identity, under the queue's rules; CSRF-protected like every change."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from server.approvals.queue import ApprovalQueue
from server.policy.engine import Decision
from server.policy.obligations import ApprovalObligation
from tests.fakes.backends import make_call, make_identity
from tests.unit.server.console.conftest import BASE, ConsoleRig


def waiting_call(rig: ConsoleRig) -> tuple[Future[Any], str]:
    """A call by agent-1 (analysts) waiting for a lead's approval; returns its future and the request id."""
    queue = rig.client.app.state.gateway.approvals  # type: ignore[attr-defined]
    assert isinstance(queue, ApprovalQueue)
    ask = ApprovalObligation(groups=("leads",), reason="resets the sales data", timeout_seconds=30)
    decision = Decision(allow=True, obligations={"require_approval": {"groups": ["leads"]}})
    call = make_call(tool_name="echo", arguments={"text": "wipe it", "api_key": "sk-abcdefghijklmnopqrstuvwx"},
                     identity=make_identity(agent_id="agent-1", subject="bob"), decision=decision)  # fmt: skip
    future = rig.client.portal.start_task_soon(queue.await_approval, call, ask)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = rig.client.portal.call(queue.list, ("pending",), 10, 0)  # type: ignore[attr-defined]
        if found:
            return future, found[0].id
        time.sleep(0.05)
    raise AssertionError("no approval request appeared")


def test_an_approver_sees_what_the_call_would_do_and_approves_it_as_themself(rig: ConsoleRig) -> None:
    future, request_id = waiting_call(rig)
    rig.sign_in("castellan:audit", "castellan:approve", agent="lena", groups=("leads",))
    page = rig.client.get("/console/approvals").text
    assert "resets the sales data" in page
    assert "wipe it" in page
    assert "sk-abcdefghijklmnopqrstuvwx" not in page  # arguments redacted
    csrf = rig.csrf(page)
    done = rig.client.post(f"/console/approvals/{request_id}/approve", data={"csrf": csrf, "comment": "ok, once"},
                           headers={"origin": BASE})  # fmt: skip
    assert done.status_code == 200
    assert "Approved" in done.text
    audit = future.result(timeout=10)  # the waiting call goes on, with what its audit record says
    assert audit["decided_by"]["subject"] == "lena@example.com"
    assert audit["comment"] == "ok, once"


def test_deciding_needs_the_approve_scope_and_membership_and_a_csrf_token(rig: ConsoleRig) -> None:
    future, request_id = waiting_call(rig)
    rig.sign_in("castellan:audit", agent="reader", groups=("leads",))
    page = rig.client.get(f"/console/approvals/{request_id}").text
    assert "needs the <code>castellan:approve</code> scope" in page
    refused = rig.client.post(f"/console/approvals/{request_id}/approve", data={"csrf": rig.csrf(page)},
                              headers={"origin": BASE})  # fmt: skip
    assert refused.status_code == 403
    rig.sign_in("castellan:audit", "castellan:approve", agent="outsider", groups=("analysts",))
    page = rig.client.get(f"/console/approvals/{request_id}").text
    not_member = rig.client.post(f"/console/approvals/{request_id}/deny", data={"csrf": rig.csrf(page)},
                                 headers={"origin": BASE})  # fmt: skip
    assert not_member.status_code == 403
    assert "only members of leads" in not_member.text
    rig.sign_in("castellan:audit", "castellan:approve", agent="lena", groups=("leads",))
    forged = rig.client.post(f"/console/approvals/{request_id}/approve", data={"csrf": "x"}, headers={"origin": BASE})
    assert forged.status_code == 403
    page = rig.client.get(f"/console/approvals/{request_id}").text
    denied = rig.client.post(f"/console/approvals/{request_id}/deny", data={"csrf": rig.csrf(page), "comment": "no"},
                             headers={"origin": BASE})  # fmt: skip
    assert "Denied" in denied.text
    assert future.exception(timeout=10) is not None  # the call is refused
