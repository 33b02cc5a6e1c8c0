"""The admin HTTP API: same bearer tokens as /mcp, plus the `castellan:admin` scope."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

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


async def require_admin(request: Request) -> Identity:
    """401 without a valid token, 403 without the admin scope."""
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
    try:
        identity = await _gateway(request).verifier.verify(token)
    except Unauthenticated as exc:
        raise HTTPException(
            401, f"unauthorized: {exc.description}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        ) from None
    if ADMIN_SCOPE not in identity.scopes:
        raise HTTPException(403, f"the {ADMIN_SCOPE} scope is required")
    return identity


AdminIdentity = Annotated[Identity, Depends(require_admin)]
router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/grants/invalidate")
async def invalidate_grants(request: Request, admin: AdminIdentity) -> dict[str, str]:
    """Drop every cached grant answer now (after an administrative change)."""
    _gateway(request).grants.invalidate()
    return {"status": "invalidated", "by": admin.agent_id}


@router.get("/usage")
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


@router.get("/audit")
async def audit_search(
    request: Request,
    admin: AdminIdentity,
    agent: str | None = None,
    subject: str | None = None,
    tool: str | None = None,
    decision: str | None = None,
    reason: str | None = None,
    policy_version: str | None = None,
    run_id: str | None = None,
    flag: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> dict[str, Any]:
    """Audited calls matching every filter given, newest first (paging with limit and offset)."""
    outbox = _gateway(request).outbox
    if not isinstance(outbox, SqliteOutbox):
        raise HTTPException(501, "this audit backend has no search")
    query = AuditQuery(
        agent=agent, subject=subject, tool=tool, decision=decision, reason=reason, policy_version=policy_version,
        run_id=run_id, flag=flag, since=since, until=until, limit=limit, offset=offset,
    )  # fmt: skip
    try:
        results = await outbox.search_async(query)
    except ValueError as exc:
        raise HTTPException(400, f"bad filter: {exc}") from None
    return {"results": results, "limit": limit, "offset": offset}


@router.get("/audit/{call_id}")
async def audit_show(request: Request, admin: AdminIdentity, call_id: str) -> dict[str, Any]:
    outbox = _gateway(request).outbox
    record = await outbox.show_async(call_id) if isinstance(outbox, SqliteOutbox) else None
    if record is None:
        raise HTTPException(404, f"no call {call_id}")
    return record


def add_admin_routes(app: FastAPI) -> None:
    app.include_router(router)
