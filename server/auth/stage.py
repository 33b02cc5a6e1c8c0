"""Pipeline stage 1, authenticate: the call has a verified identity holding the required scopes."""

from __future__ import annotations

from collections.abc import Sequence

from server.auth.scopes import ToolScopes
from server.call import Call
from server.errors import Denied


class AuthenticateStage:
    """Denies a call without an identity (the HTTP edge verified the token) or missing a scope the call
    needs (`ToolScopes`: the required ones and the tool's own). Over HTTP the edge answers 403 first."""

    name = "authenticate"

    def __init__(self, required_scopes: Sequence[str] = (), scopes: ToolScopes | None = None) -> None:
        self._scopes = scopes or ToolScopes(required_scopes)

    async def run(self, call: Call) -> Call:
        identity = call.identity
        if identity is None:
            raise Denied(self.name, "no authenticated identity")
        # A tool that needs a scope of its own is still listed: calling it is how the client learns to step up.
        tool = None if call.action == "list" else call.tool_name
        missing = self._scopes.missing(tool, identity.scopes)
        if missing:
            raise Denied(self.name, *(f"token lacks scope {s!r}" for s in missing))
        return call
