"""A TTL cache in front of a grant source, with explicit invalidation and a bound on staleness."""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from server.errors import BackendUnavailable
from server.grants.source import GrantSource
from server.identity import Principal

log = structlog.get_logger("castellan.grants")


class CachedGrants:
    """Effective privileges cached per (typed principals, securable) for `ttl` seconds, so a revoke takes
    effect within `ttl`. When the source cannot answer, an entry up to `max_stale` seconds old is
    still used (and said so in the log); an older one, or none, denies the call (fail closed).
    Errors are never cached. `invalidate()` drops everything (after an admin change)."""

    def __init__(self, source: GrantSource, ttl: float, max_stale: float = 300.0, max_entries: int = 50_000) -> None:
        self._source = source
        self._ttl = ttl
        self._max_stale = max_stale
        self._max_entries = max_entries
        self._entries: dict[tuple[tuple[Principal, ...], str, str], tuple[float, frozenset[str]]] = {}

    def fresh(self, principals: Sequence[Principal], securable_type: str, securable: str) -> frozenset[str] | None:
        """The cached privileges while they are within `ttl` (what `privileges` would answer without
        asking the source), else None."""
        hit = self._entries.get((tuple(principals), securable_type, securable))
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self._ttl else None

    async def privileges(self, principals: Sequence[Principal], securable_type: str, securable: str) -> frozenset[str]:
        # Keyed on kind and name: the service principal `admins` and the group `admins` never share an entry.
        key = (tuple(principals), securable_type, securable)
        hit = self._entries.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        try:
            held = await self._source.privileges(principals, securable_type, securable)
        except BackendUnavailable:
            if hit is not None and now - hit[0] < self._max_stale:
                log.warning("grants_served_stale", securable=securable, age_s=round(now - hit[0], 1))
                return hit[1]
            raise
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key] = (now, held)
        return held

    def invalidate(self) -> None:
        self._entries.clear()
