"""Approvals: the pending queue with what each call would do, and approve/deny with a comment. The
approver is the signed-in identity; the rules (the request's groups, never one's own call, only while
pending) are the queue's (server/approvals), so the console, the CLI and the admin API agree. The
decision is written into the waiting call's audit record (`approval.decided_by`)."""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.approvals.errors import ApprovalActionError
from server.approvals.queue import ApprovalQueue
from server.approvals.request import STATUSES
from server.console.context import Console, ConsoleUser, console_of, redirect
from server.console.roles import Role
from server.errors import BackendUnavailable

log = structlog.get_logger("castellan.console")
MAX_COMMENT = 2_000


def _queue(console: Console) -> ApprovalQueue | None:
    queue = getattr(console.gateway, "approvals", None)
    return queue if isinstance(queue, ApprovalQueue) else None


def _shown(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "arguments_json": json.dumps(doc.get("arguments"), indent=2, default=str)}


async def list_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    queue = _queue(console)
    if queue is None:
        return console.render(request, "unavailable.html", user, status=501, what="Approvals are not configured.")
    status = request.query_params.get("status", "pending")
    statuses = None if status == "all" else (status,) if status in STATUSES else ("pending",)
    try:
        found = await queue.list(statuses, 100, 0)
    except BackendUnavailable as exc:
        return console.render(request, "unavailable.html", user, status=503, what="; ".join(exc.reasons))
    now = time.time()
    docs = [_shown(console.redactor.apply(r.as_document(now))) for r in found]
    return console.render(request, "approvals/list.html", user, approvals=docs, shown_status=status,
                          statuses=[*STATUSES, "all"])  # fmt: skip


async def show_page(request: Request, *, message: str = "", error: str = "", status: int = 200) -> Response:
    console = console_of(request)
    user = await console.require(request)
    queue = _queue(console)
    if queue is None:
        return console.render(request, "unavailable.html", user, status=501, what="Approvals are not configured.")
    request_id = request.path_params["request_id"]
    try:
        found = await queue.get(request_id)
    except BackendUnavailable as exc:
        return console.render(request, "unavailable.html", user, status=503, what="; ".join(exc.reasons))
    if found is None:
        return console.render(request, "not_found.html", user, status=404, what=f"No approval request {request_id}.")
    doc = _shown(console.redactor.apply(found.as_document(time.time())))
    return console.render(request, "approvals/show.html", user, status=status, a=doc, message=message, error=error)


async def decide(request: Request) -> Response:
    console = console_of(request)
    user: ConsoleUser = await console.require(request, Role.APPROVE)
    queue = _queue(console)
    if queue is None:
        return console.render(request, "unavailable.html", user, status=501, what="Approvals are not configured.")
    request_id = request.path_params["request_id"]
    verb = request.path_params["verb"]
    form = await request.form()
    comment = str(form.get("comment") or "").strip()
    if len(comment) > MAX_COMMENT:
        return await show_page(request, error=f"The comment is longer than {MAX_COMMENT} characters.", status=400)
    try:
        if verb == "approve":
            await queue.approve(request_id, user.identity, comment)
        else:
            await queue.deny(request_id, user.identity, comment)
    except ApprovalActionError as exc:
        return await show_page(request, error=exc.message, status=exc.status)
    except BackendUnavailable as exc:
        return await show_page(request, error="; ".join(exc.reasons), status=503)
    log.info("console_approval_decided", approval=request_id, verb=verb, by=user.identity.subject,
             agent_id=user.identity.agent_id)  # fmt: skip
    return redirect(f"/console/approvals/{request_id}?done={verb}", request)


async def show(request: Request) -> Response:
    done = request.query_params.get("done")
    message = {"approve": "Approved: the call runs now.", "deny": "Denied: the call is refused."}.get(done or "", "")
    return await show_page(request, message=message)


ROUTES = [
    Route("/approvals", list_page, methods=["GET"]),
    Route("/approvals/{request_id}", show, methods=["GET"]),
    Route("/approvals/{request_id}/{verb:str}", decide, methods=["POST"]),
]
