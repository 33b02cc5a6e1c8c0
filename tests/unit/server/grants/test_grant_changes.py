"""The gateway hears of a grant change made by another process: its cache is dropped, so a revoke holds from
the next call, and connected agents are told their lists changed (server/grants/changes.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from server.grants.cache import CachedGrants
from server.grants.changes import LISTS, GrantChanges
from server.grants.local import LocalCatalog
from server.identity import Principal

pytestmark = pytest.mark.anyio
ALICE = (Principal("user", "alice"),)


def catalog(path: Path) -> LocalCatalog:
    c = LocalCatalog(path)
    c.add_principal("alice", "user")
    c.add_securable("CATALOG", "main")
    c.add_securable("SCHEMA", "main.tools")
    return c


async def test_a_grant_and_a_revoke_from_another_process_are_each_announced_once_and_hold_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "catalog.db"
    gateway_side = catalog(path)
    cache = CachedGrants(gateway_side, ttl=3600)  # without the watcher a revoke would wait an hour
    announced: list[tuple[str, ...]] = []

    async def announce(kinds: Iterable[str]) -> None:
        announced.append(tuple(kinds))

    changes = GrantChanges(path, cache, announce, interval=3600)  # looked at by hand below
    await changes.start()
    try:
        assert await cache.privileges(ALICE, "CATALOG", "main") == frozenset()
        assert await changes.look() is False  # nothing changed: nothing said
        gateway_side.add_securable("FUNCTION", "main.tools.new_tool")  # an upstream's new tool registered
        assert await changes.look() is False  # no grant changed (the manager announces the tool itself)
        cli = LocalCatalog(path)  # `castellan grants` in a process of its own
        cli.grant("USE CATALOG", "main", "alice")
        assert await changes.look() is True
        assert await cache.privileges(ALICE, "CATALOG", "main") == frozenset({"USE CATALOG"})
        cli.revoke("USE CATALOG", "main", "alice")
        cli.grant("BROWSE", "main", "alice")  # two commits between looks: one announcement
        assert await changes.look() is True
        assert await changes.look() is False
        assert await cache.privileges(ALICE, "CATALOG", "main") == frozenset({"BROWSE"})
        await cli.close()
    finally:
        await changes.stop()
        await gateway_side.close()
    assert announced == [LISTS, LISTS]
    assert changes.seen == 2


async def test_the_watcher_notices_by_itself_and_stops_cleanly(tmp_path: Path) -> None:
    import anyio

    path = tmp_path / "catalog.db"
    gateway_side = catalog(path)
    heard = anyio.Event()

    async def announce(kinds: Iterable[str]) -> None:
        heard.set()

    changes = GrantChanges(path, CachedGrants(gateway_side, ttl=60), announce, interval=0.05)
    await changes.start()
    try:
        LocalCatalog(path).grant("USE CATALOG", "main", "alice")
        with anyio.fail_after(30):
            await heard.wait()
    finally:
        await changes.stop()
        await gateway_side.close()
