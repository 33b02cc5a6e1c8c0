"""`/admin/approvals`: list, show, approve and deny approval requests (scope `castellan:approve`).

The approver is the bearer token's identity; the rules (their groups, never their own call) are the
queue's, so the CLI and the console get the same answers."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field

from server.admin import ADMIN_SCOPE, ErrorBody, authorize
from server.approvals.errors import ApprovalActionError
from server.approvals.queue import ApprovalQueue
from server.approvals.request import STATUSES, Status
from server.errors import BackendUnavailable

APPROVE_SCOPE = "castellan:approve"

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No valid bearer token"},
    403: {"model": ErrorBody, "description": f"The token lacks the {APPROVE_SCOPE} scope, or may not decide this"},
    503: {"model": ErrorBody, "description": "The approval queue cannot answer"},
}
router = APIRouter(prefix="/admin/approvals", tags=["approvals"], responses=_ERRORS)
_ONE = "(?:" + "|".join(STATUSES) + ")"
_STATUS_PATTERN = f"^(?:all|{_ONE}(?:,{_ONE})*)$"
"""What `status` takes, in the OpenAPI document too (anything else is a 422 before the handler)."""


class DecisionBody(BaseModel):
    comment: str = Field(default="", max_length=2000)


def _queue(request: Request) -> ApprovalQueue:
    queue = getattr(request.app.state.gateway, "approvals", None)
    if not isinstance(queue, ApprovalQueue):
        raise HTTPException(503, "approvals are not configured")
    return queue


@router.get("", responses={400: {"model": ErrorBody, "description": "Unknown status"}})
async def list_approvals(
    request: Request,
    status: Annotated[
        str,
        Query(
            description="pending (default), approved, denied, expired, used (comma-separated), or all",
            pattern=_STATUS_PATTERN,
        ),
    ] = "pending",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> dict[str, Any]:
    """Approval requests, newest first: what each call would do, who asks, who may approve."""
    await authorize(request, APPROVE_SCOPE, ADMIN_SCOPE)
    statuses: tuple[Status, ...] | None
    if status == "all":
        statuses = None
    else:
        wanted = tuple(s.strip() for s in status.split(",") if s.strip())
        unknown = [s for s in wanted if s not in STATUSES]
        if unknown or not wanted:
            choices = ", ".join(STATUSES)
            raise HTTPException(400, f"unknown status {', '.join(unknown) or status!r}; choose from {choices}, all")
        statuses = wanted  # type: ignore[assignment]
    try:
        found = await _queue(request).list(statuses, limit, offset)
    except BackendUnavailable as exc:
        raise HTTPException(503, "; ".join(exc.reasons)) from None
    now = time.time()
    return {"approvals": [r.as_document(now) for r in found], "limit": limit, "offset": offset}


@router.get("/{request_id}", responses={404: {"model": ErrorBody, "description": "No such request"}})
async def show_approval(request: Request, request_id: str) -> dict[str, Any]:
    await authorize(request, APPROVE_SCOPE, ADMIN_SCOPE)
    try:
        found = await _queue(request).get(request_id)
    except BackendUnavailable as exc:
        raise HTTPException(503, "; ".join(exc.reasons)) from None
    if found is None:
        raise HTTPException(404, f"no approval request {request_id}")
    return found.as_document(time.time())


_DECIDE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body is not JSON"},
    404: {"model": ErrorBody, "description": "No such request"},
    409: {"model": ErrorBody, "description": "The request is no longer pending"},
}


@router.post("/{request_id}/approve", responses=_DECIDE_ERRORS)
async def approve(request: Request, request_id: str, body: DecisionBody | None = None) -> dict[str, Any]:
    """Approve: the waiting call (and only it) runs. Never the approver's own call."""
    return await _decide(request, request_id, "approve", body)


@router.post("/{request_id}/deny", responses=_DECIDE_ERRORS)
async def deny(request: Request, request_id: str, body: DecisionBody | None = None) -> dict[str, Any]:
    """Deny: the waiting call is refused with the approver's comment."""
    return await _decide(request, request_id, "deny", body)


async def _decide(request: Request, request_id: str, verb: str, body: DecisionBody | None) -> dict[str, Any]:
    approver = await authorize(request, APPROVE_SCOPE)
    queue = _queue(request)
    comment = body.comment if body else ""
    try:
        if verb == "approve":
            decided = await queue.approve(request_id, approver, comment)
        else:
            decided = await queue.deny(request_id, approver, comment)
    except ApprovalActionError as exc:
        raise HTTPException(exc.status, exc.message) from None
    except BackendUnavailable as exc:
        raise HTTPException(503, "; ".join(exc.reasons)) from None
    return decided.as_document(time.time())


def add_approval_routes(app: FastAPI) -> None:
    app.include_router(router)
