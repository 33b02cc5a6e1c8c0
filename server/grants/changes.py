"""Grant changes made anywhere reach the gateway at once: the grant cache is dropped and connected agents
are told their lists changed, without reconnecting.

The local catalog is one SQLite file that `castellan grants`, the admin API, another replica on the same
file or an import may change. A connection of the watcher's own reads `PRAGMA data_version` every
`grants.watch_seconds`; SQLite changes that number whenever another connection commits to the file (in
any process), so nothing is missed between two looks. Only then is what decides visibility read (grants,
memberships, principals, owners) and compared by digest: the gateway's own registration of a new tool's
or resource's securable (announced by the upstream manager already) is no grant change. On one the watcher
drops the grant cache (a revoke then holds from the next call, not within `cache_ttl_seconds`) and sends
list-changed for tools, resources and prompts: what an identity may see is decided by grants, and each
client lists again and sees its own filtered view. A Databricks workspace offers no change feed: there a
change is seen within the cache's TTL, and at the client's next list.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import structlog

from server.grants.cache import CachedGrants

log = structlog.get_logger("castellan.grants")

LISTS = ("tools", "resources", "prompts")
"""The lists a grant decides what each identity sees of."""
_GRANTING = (
    "SELECT principal, privilege, securable FROM grants ORDER BY 1, 2, 3",
    "SELECT member, grp FROM members ORDER BY 1, 2",
    "SELECT name, kind FROM principals ORDER BY 1",
    "SELECT name, owner FROM securables WHERE owner != '' ORDER BY 1",
)
"""What decides who holds what; a securable registered without an owner changes none of it."""


class GrantChanges:
    """Polls the local catalog's `data_version` and announces each change once (changes between two looks
    are one announcement). A failed look is logged and retried at the next interval; it never stops the
    watcher or the gateway."""

    def __init__(
        self,
        path: Path,
        cache: CachedGrants,
        announce: Callable[[Iterable[str]], Awaitable[None]],
        interval: float,
    ) -> None:
        self._path = path
        self._cache = cache
        self._announce = announce
        self._interval = interval
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._digest: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.seen = 0
        """Changes announced so far (for tests and the log)."""

    def _read(self) -> tuple[int, str | None]:
        """The file's data version and, when it moved since the last look, the digest of what grants."""
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
        version: int = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return version, None
        digest = hashlib.sha256()
        for query in _GRANTING:
            for row in self._conn.execute(query):
                digest.update(repr(row).encode())
            digest.update(b"\x00")
        return version, digest.hexdigest()

    async def start(self) -> None:
        # the catalog as the gateway starts with it
        self._version, self._digest = await asyncio.to_thread(self._read)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="grant-changes")

    async def look(self) -> bool:
        """One look; True when the grants changed since the last one (then it was announced)."""
        version, digest = await asyncio.to_thread(self._read)
        self._version = version
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        self._cache.invalidate()
        self.seen += 1
        log.info("grants_changed", path=str(self._path), announced=list(LISTS))
        await self._announce(LISTS)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.look()
            except Exception as exc:  # a locked or vanished file: look again next time
                log.warning("grant_changes_unread", path=str(self._path), error=repr(exc))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
