"""The admin HTTP API: same bearer tokens as /mcp, plus the `castellan:admin` scope."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, BeforeValidator

from server.audit.outbox import SqliteOutbox
from server.audit.search import AuditQuery
from server.auth.middleware import bearer_token
from server.errors import BackendUnavailable, Unauthenticated
from server.gateway import Gateway
from server.identity import Identity
from server.metering.limits import resolve_limits
from server.metering.usage import usage_document

ADMIN_SCOPE = "castellan:admin"


def _gateway(request: Request) -> Gateway:
    gateway = request.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway


async def authorize(request: Request, *scopes: str) -> Identity:
    """401 without a valid token, 403 unless it holds one of `scopes`."""
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
    try:
        identity = await _gateway(request).verifier.verify(token)
    except Unauthenticated as exc:
        raise HTTPException(
            401, f"unauthorized: {exc.description}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        ) from None
    if not set(scopes) & set(identity.scopes):
        raise HTTPException(403, f"the {' or '.join(scopes)} scope is required")
    return identity


async def require_admin(request: Request) -> Identity:
    """401 without a valid token, 403 without the admin scope."""
    return await authorize(request, ADMIN_SCOPE)


AdminIdentity = Annotated[Identity, Depends(require_admin)]


class ErrorBody(BaseModel):
    detail: str


# What every admin endpoint may answer besides success (documented for clients and API fuzzers).
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No valid bearer token"},
    403: {"model": ErrorBody, "description": f"The token lacks the {ADMIN_SCOPE} scope"},
}
router = APIRouter(prefix="/admin", tags=["admin"], responses=_ERRORS)


@router.post("/grants/invalidate")
async def invalidate_grants(request: Request, admin: AdminIdentity) -> dict[str, str]:
    """Drop every cached grant answer now (after an administrative change)."""
    _gateway(request).grants.invalidate()
    return {"status": "invalidated", "by": admin.agent_id}


@router.get("/usage", responses={503: {"model": ErrorBody, "description": "The meter store cannot answer"}})
async def usage(request: Request, admin: AdminIdentity, agent: str, groups: str = "") -> dict[str, Any]:
    """An agent's consumption against its limits (limits resolved as for a token naming `groups`)."""
    gateway = _gateway(request)
    identity = Identity(agent_id=agent, subject=agent, issuer="", groups=tuple(g for g in groups.split(",") if g))
    limits = resolve_limits(gateway.settings.metering, identity)
    try:
        report = await gateway.meter.usage(agent, limits)
    except BackendUnavailable as exc:
        raise HTTPException(503, "; ".join(exc.reasons)) from None
    return usage_document(report)


_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?)?$")


def _iso_only(value: Any) -> Any:
    """Only ISO 8601 text is a time here (pydantic alone would also take `0.5` as epoch seconds)."""
    if isinstance(value, str) and not _ISO_TIME.match(value):
        raise ValueError("expected an ISO 8601 date or time, e.g. 2026-11-01T00:00:00Z")
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_only)]


def _iso(moment: datetime | None) -> str | None:
    """A time without a zone is UTC."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


@router.get(
    "/audit",
    responses={400: {"model": ErrorBody, "description": "A filter cannot be applied"},
               501: {"model": ErrorBody, "description": "The audit backend has no search"}},
)  # fmt: skip
async def audit_search(
    request: Request,
    admin: AdminIdentity,
    agent: str | None = None,
    subject: str | None = None,
    tool: str | None = None,
    decision: Annotated[str | None, Query(pattern="^(allow|deny|error)$")] = None,
    reason: str | None = None,
    policy_version: str | None = None,
    run_id: str | None = None,
    flag: str | None = None,
    outcome: Annotated[str | None, Query(pattern="^(ok|error|interrupted|unfinished)$")] = None,
    since: Annotated[IsoTime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[IsoTime | None, Query(description="ISO 8601 time, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    shadow_diff: Annotated[bool, Query(description="only calls the shadow policy would decide otherwise")] = False,
) -> dict[str, Any]:
    """Audited calls matching every filter given, newest first (paging with limit and offset)."""
    outbox = _gateway(request).outbox
    if not isinstance(outbox, SqliteOutbox):
        raise HTTPException(501, "this audit backend has no search")
    filters = {
        "agent": agent, "subject": subject, "tool": tool, "decision": decision, "reason": reason,
        "policy_version": policy_version, "run_id": run_id, "flag": flag, "outcome": outcome,
        "since": _iso(since), "until": _iso(until),
    }  # fmt: skip
    # An empty parameter (`?agent=`) filters nothing, as a form would mean it.
    given: dict[str, Any] = {k: v for k, v in filters.items() if v}
    query = AuditQuery(**given, limit=limit, offset=offset, shadow_diff=shadow_diff)
    try:
        results = await outbox.search_async(query)
    except ValueError as exc:
        raise HTTPException(400, f"bad filter: {exc}") from None
    return {"results": results, "limit": limit, "offset": offset}


@router.get("/audit/{call_id}", responses={404: {"model": ErrorBody, "description": "No such call"}})
async def audit_show(request: Request, admin: AdminIdentity, call_id: str) -> dict[str, Any]:
    outbox = _gateway(request).outbox
    record = await outbox.show_async(call_id) if isinstance(outbox, SqliteOutbox) else None
    if record is None:
        raise HTTPException(404, f"no call {call_id}")
    return record


def add_admin_routes(app: FastAPI) -> None:
    app.include_router(router)
