"""Pipeline stage 1, authenticate: the call has a verified identity holding the required scopes."""

from __future__ import annotations

from collections.abc import Sequence

from server.call import Call
from server.errors import Denied


class AuthenticateStage:
    """Denies a call without an identity (the HTTP edge verified the token) or missing a required scope."""

    name = "authenticate"

    def __init__(self, required_scopes: Sequence[str] = ()) -> None:
        self._required = tuple(required_scopes)

    async def run(self, call: Call) -> Call:
        identity = call.identity
        if identity is None:
            raise Denied(self.name, "no authenticated identity")
        missing = [s for s in self._required if s not in identity.scopes]
        if missing:
            raise Denied(self.name, *(f"token lacks scope {s!r}" for s in missing))
        return call
