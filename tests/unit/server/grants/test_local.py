from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.errors import BackendUnavailable, Denied
from server.grants.local import LocalCatalog
from server.grants.stage import CachedGrants, GrantsStage
from server.testing import FakeTool, make_call, make_identity

pytestmark = pytest.mark.anyio


@pytest.fixture
def catalog(tmp_path: Path) -> LocalCatalog:
    return LocalCatalog(tmp_path / "catalog.db")


def stage(catalog: LocalCatalog, ttl: float = 0.0) -> GrantsStage:
    return GrantsStage(CachedGrants(catalog, ttl))


def reach(catalog: LocalCatalog, principal: str) -> None:
    catalog.grant("USE CATALOG", "main", principal)
    catalog.grant("USE SCHEMA", "main.tools", principal)


async def test_execute_on_the_function_with_use_on_parents_allows(catalog: LocalCatalog) -> None:
    reach(catalog, "analysts")
    catalog.grant("EXECUTE", "main.tools.fake", "analysts")
    call = await stage(catalog).run(make_call())
    assert call.grants is not None
    assert call.grants.has == ("USE CATALOG on main", "USE SCHEMA on main.tools", "EXECUTE on main.tools.fake")
    assert call.grants.missing == ()


async def test_execute_granted_on_the_schema_is_inherited(catalog: LocalCatalog) -> None:
    reach(catalog, "analysts")
    catalog.grant("EXECUTE", "main.tools", "analysts")
    await stage(catalog).run(make_call())


async def test_all_privileges_on_the_catalog_covers_everything_below(catalog: LocalCatalog) -> None:
    catalog.grant("ALL PRIVILEGES", "main", "admins")
    await stage(catalog).run(make_call(identity=make_identity(groups=("admins",))))


async def test_missing_use_schema_is_denied_naming_it(catalog: LocalCatalog) -> None:
    catalog.grant("USE CATALOG", "main", "analysts")
    catalog.grant("EXECUTE", "main.tools.fake", "analysts")
    with pytest.raises(Denied) as denied:
        await stage(catalog).run(make_call())
    assert denied.value.reasons == ("missing privilege USE SCHEMA on main.tools",)


async def test_grants_to_the_agent_itself_count(catalog: LocalCatalog) -> None:
    reach(catalog, "agent-1")
    catalog.grant("EXECUTE", "main.tools.fake", "agent-1")
    await stage(catalog).run(make_call(identity=make_identity(groups=())))


async def test_a_grant_to_another_group_does_not_help(catalog: LocalCatalog) -> None:
    reach(catalog, "admins")
    catalog.grant("EXECUTE", "main.tools.fake", "admins")
    with pytest.raises(Denied) as denied:
        await stage(catalog).run(make_call())
    assert len(denied.value.reasons) == 3


async def test_execute_on_a_sibling_function_does_not_leak(catalog: LocalCatalog) -> None:
    reach(catalog, "analysts")
    catalog.grant("EXECUTE", "main.tools.other", "analysts")
    with pytest.raises(Denied, match=r"EXECUTE on main\.tools\.fake"):
        await stage(catalog).run(make_call())


async def test_a_revoke_takes_effect_when_the_cache_entry_expires(catalog: LocalCatalog) -> None:
    reach(catalog, "analysts")
    catalog.grant("EXECUTE", "main.tools.fake", "analysts")
    grants = stage(catalog, ttl=0.3)
    await grants.run(make_call())
    assert catalog.revoke("EXECUTE", "main.tools.fake", "analysts") == 1
    await grants.run(make_call())  # still cached: within the TTL
    await asyncio.sleep(0.35)
    with pytest.raises(Denied, match=r"missing privilege EXECUTE on main\.tools\.fake"):
        await grants.run(make_call())


async def test_the_catalog_being_unreadable_denies(tmp_path: Path) -> None:
    (tmp_path / "catalog.db").mkdir()  # a directory where the database file should be
    catalog = LocalCatalog(tmp_path / "catalog.db")
    with pytest.raises(BackendUnavailable, match="grant source unavailable"):
        await stage(catalog).run(make_call(tool=FakeTool()))
