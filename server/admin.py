"""The admin HTTP API: same bearer tokens as /mcp, plus the `castellan:admin` scope."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

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
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
    try:
        identity = await _gateway(request).verifier.verify(token.strip())
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


def add_admin_routes(app: FastAPI) -> None:
    app.include_router(router)
