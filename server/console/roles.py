"""Console roles, from the scopes of the signed-in token: audit reads, approve approves, admin administers."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

AUDIT_SCOPE = "castellan:audit"
APPROVE_SCOPE = "castellan:approve"
ADMIN_SCOPE = "castellan:admin"


class Role(StrEnum):
    AUDIT = "audit"
    APPROVE = "approve"
    ADMIN = "admin"


def roles_from_scopes(scopes: Iterable[str]) -> frozenset[Role]:
    """`castellan:admin` holds every role; `castellan:approve` approves but sees the console only
    with `castellan:audit` too (every page shows audit data: who called what)."""
    held = set(scopes)
    if ADMIN_SCOPE in held:
        return frozenset(Role)
    roles = set()
    if AUDIT_SCOPE in held:
        roles.add(Role.AUDIT)
    if APPROVE_SCOPE in held:
        roles.add(Role.APPROVE)
    return frozenset(roles)


def may_enter(roles: frozenset[Role]) -> bool:
    """Only a reader of the audit trail sees anything but the sign-in page."""
    return Role.AUDIT in roles
