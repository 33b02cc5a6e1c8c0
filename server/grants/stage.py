"""Pipeline stage 3, grants: the identity holds every privilege the call's securables need."""

from __future__ import annotations

import asyncio
import functools

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
        checked = call.grants.has if call.grants else ()  # by the function-only pass
        needed = [(r, label) for r, label in _labelled(call, self._function_only) if label not in checked]
        if not needed and call.grants is not None and not call.grants.missing:
            return call  # everything it needs was checked (and held) by the function-only pass
        # fresh cache entries are read here; only the rest are asked for, concurrently (a task each)
        held: list[frozenset[str] | None] = [
            self._grants.fresh(principals, r.securable_type, r.securable) for r, _ in needed
        ]
        misses = [i for i, privs in enumerate(held) if privs is None]
        if misses:
            bound = caller.set(call.identity)  # a source acting on the caller's behalf reads whose call it is
            try:
                asked = await asyncio.gather(
                    *(
                        self._grants.privileges(principals, needed[i][0].securable_type, needed[i][0].securable)
                        for i in misses
                    )
                )
            finally:
                caller.reset(bound)
            for i, privs in zip(misses, asked, strict=True):
                held[i] = privs
        has = [label for (r, label), privs in zip(needed, held, strict=True) if privs is not None and holds(r, privs)]
        if len(has) < len(needed):
            missing = [label for (r, label), privs in zip(needed, held, strict=True)
                       if privs is None or not holds(r, privs)]  # fmt: skip
            found = GrantCheck(has=(*checked, *has), missing=tuple(missing))  # the record shows both
            raise Denied(self.name, *(f"missing privilege {m}" for m in missing), grants=found)
        return call.evolve(grants=GrantCheck(has=(*checked, *has), missing=()))


@functools.lru_cache(maxsize=4_096)
def _function_needs(securable: str) -> tuple[tuple[Requirement, str], ...]:
    """A function's requirements with their labels: the same three for every call of a tool."""
    return tuple((r, str(r)) for r in function_requirements(securable))


def _labelled(call: Call, function_only: bool) -> tuple[tuple[Requirement, str], ...]:
    """`base_requirements` (`function_only`) or `requirements` of the call, each with its label."""
    assert call.tool is not None
    own = getattr(call.tool, "requirements", None)
    needed = tuple((r, str(r)) for r in own()) if own is not None else _function_needs(call.tool.spec.securable)
    extra = getattr(call.tool, "required_grants", None)
    if function_only or extra is None or call.action != "call":
        return needed
    return tuple(dict.fromkeys([*needed, *((r, str(r)) for r in extra(call.arguments))]))
