"""The admin HTTP API: same bearer tokens as /mcp, plus the `castellan:admin` scope."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

from server.errors import Unauthenticated
from server.gateway import Gateway
from server.identity import Identity

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


def add_admin_routes(app: FastAPI) -> None:
    app.include_router(router)
