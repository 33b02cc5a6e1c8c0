"""Pipeline stage 3, grants: the identity holds every privilege the tool's securables need."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace

from server.call import Call, GrantCheck
from server.errors import Denied
from server.grants.source import GrantSource, Requirement, function_requirements


class CachedGrants:
    """Effective privileges cached for `ttl` seconds per (principals, securable): a revoke takes effect
    within `ttl`. Errors are not cached; `invalidate()` drops everything (after an admin change)."""

    def __init__(self, source: GrantSource, ttl: float) -> None:
        self._source = source
        self._ttl = ttl
        self._entries: dict[tuple[tuple[str, ...], str], tuple[float, frozenset[str]]] = {}

    async def privileges(self, principals: Sequence[str], securable: str) -> frozenset[str]:
        key = (tuple(principals), securable)
        hit = self._entries.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        held = await self._source.privileges(principals, securable)
        if len(self._entries) > 50_000:
            self._entries.clear()
        self._entries[key] = (now, held)
        return held

    def invalidate(self) -> None:
        self._entries.clear()


class GrantsStage:
    """Checks USE CATALOG, USE SCHEMA and EXECUTE for the tool's function securable. Missing privileges
    deny the call, naming each one; the source being down denies it too (fail closed)."""

    name = "grants"

    def __init__(self, grants: CachedGrants) -> None:
        self._grants = grants

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        assert call.tool is not None
        principals = call.identity.principals
        needed = function_requirements(call.tool.spec.securable)
        held = await asyncio.gather(*(self._grants.privileges(principals, r.securable) for r in needed))
        has = [str(r) for r, privs in zip(needed, held, strict=True) if _holds(r, privs)]
        missing = [str(r) for r, privs in zip(needed, held, strict=True) if not _holds(r, privs)]
        if missing:
            raise Denied(self.name, *(f"missing privilege {m}" for m in missing))
        return replace(call, grants=GrantCheck(has=tuple(has), missing=()))


def _holds(requirement: Requirement, privileges: frozenset[str]) -> bool:
    return requirement.privilege in privileges or "*" in privileges
