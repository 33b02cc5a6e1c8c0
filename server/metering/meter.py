"""The meter contract: admit a call against the identity's limits, then charge what it used."""

from __future__ import annotations

from typing import Protocol

from server.call import Budget, RunInfo
from server.identity import Identity
from server.settings import Limits


class Meter(Protocol):
    """Counts calls and tokens per identity, atomically.

    `admit` raises `Denied("admit", reason)` naming the limit, or `BackendUnavailable` when the
    store cannot answer (the call is then denied: fail closed). It never admits on error.
    """

    async def admit(self, identity: Identity, run: RunInfo, call_key: str, limits: Limits) -> Budget: ...

    async def charge(self, identity: Identity, tokens: int) -> None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...
