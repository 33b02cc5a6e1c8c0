"""Pipeline stage 3, grants: the identity holds every privilege the call's securables need."""

from __future__ import annotations

import asyncio

from server.call import Call, GrantCheck
from server.errors import Denied
from server.grants.cache import CachedGrants
from server.grants.source import Requirement, function_requirements, holds
from server.invoke import caller


def requirements(call: Call) -> tuple[Requirement, ...]:
    """USE CATALOG, USE SCHEMA and EXECUTE for the tool's function; plus whatever the tool derives
    from the arguments itself (the SQL tool: SELECT on the tables its query reads, parsed, never
    taken from the agent's word)."""
    assert call.tool is not None
    needed = base_requirements(call)
    extra = getattr(call.tool, "required_grants", None)
    if extra is not None and call.action == "call":
        needed = tuple(dict.fromkeys([*needed, *extra(call.arguments)]))
    return needed


def base_requirements(call: Call) -> tuple[Requirement, ...]:
    """What the call's target itself needs: a tool's function EXECUTE, or what a target that is not
    a function declares (a resource: READ on it)."""
    assert call.tool is not None
    own = getattr(call.tool, "requirements", None)
    return tuple(own()) if own is not None else function_requirements(call.tool.spec.securable)


class GrantsStage:
    """Checks every requirement against the identity's effective privileges. Missing privileges deny
    the call, each named; the source being down (past the cache's staleness bound) denies it too."""

    name = "grants"

    def __init__(self, grants: CachedGrants, *, function_only: bool = False) -> None:
        self._grants = grants
        self._function_only = function_only
        """Only the tool's function privileges: checked before the arguments are validated (cheap
        refusals first); what the tool derives from the arguments needs them valid."""

    async def run(self, call: Call) -> Call:
        assert call.identity is not None
        principals = call.identity.principals
        assert call.tool is not None
        needed = base_requirements(call) if self._function_only else requirements(call)
        checked = call.grants.has if call.grants else ()  # by the function-only pass
        needed = tuple(r for r in needed if str(r) not in checked)
        # fresh cache entries are read here; only the rest are asked for, concurrently (a task each)
        held: list[frozenset[str] | None] = [
            self._grants.fresh(principals, r.securable_type, r.securable) for r in needed
        ]
        misses = [i for i, privs in enumerate(held) if privs is None]
        if misses:
            bound = caller.set(call.identity)  # a source acting on the caller's behalf reads whose call it is
            try:
                asked = await asyncio.gather(
                    *(
                        self._grants.privileges(principals, needed[i].securable_type, needed[i].securable)
                        for i in misses
                    )
                )
            finally:
                caller.reset(bound)
            for i, privs in zip(misses, asked, strict=True):
                held[i] = privs
        has = [str(r) for r, privs in zip(needed, held, strict=True) if privs is not None and holds(r, privs)]
        missing = [str(r) for r, privs in zip(needed, held, strict=True) if privs is None or not holds(r, privs)]
        if missing:
            found = GrantCheck(has=(*checked, *has), missing=tuple(missing))  # the record shows both
            raise Denied(self.name, *(f"missing privilege {m}" for m in missing), grants=found)
        return call.evolve(grants=GrantCheck(has=(*checked, *has), missing=()))
