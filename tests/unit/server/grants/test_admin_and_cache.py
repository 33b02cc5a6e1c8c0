from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from server.errors import BackendUnavailable, ConfigError
from server.grants import admin
from server.grants.cache import CachedGrants
from server.grants.local import LocalCatalog
from server.identity import service_principal
from tests.fakes import databricks_uc

pytestmark = pytest.mark.anyio


def test_a_grant_statement_is_parsed_like_sql() -> None:
    statement = admin.parse(["use", "catalog,", "USE_SCHEMA", "ON", "catalog", "main", "TO", "account", "users"], "TO")
    assert statement == admin.GrantStatement(("USE CATALOG", "USE SCHEMA"), "CATALOG", "main", "account users")


@pytest.mark.parametrize(
    "words",
    [
        "EXECUTE main.tools.x TO a",
        "EXECUTE ON FUNCTION TO a",
        "ON FUNCTION main.tools.x TO a",
        "EXECUTE ON VIEW main.tools.x TO a",
        "EXECUTE ON FUNCTION main.tools.x TO",
        "EXECUTE ON FUNCTION main.x FROM a",
    ],
)
def test_malformed_statements_say_what_is_expected(words: str) -> None:
    with pytest.raises(ConfigError, match="expected: PRIVILEGE"):
        admin.parse(words.split(), "TO")


def test_export_then_import_reproduces_the_catalog(tmp_path: Path) -> None:
    first = LocalCatalog(tmp_path / "a.db")
    first.add_principal("alice", "user")
    first.add_principal("bot", "service_principal")
    first.add_securable("FUNCTION", "main.tools.x", owner="alice")
    first.add_principal("analysts", "group")
    first.add_member("bot", "analysts")
    first.grant("EXECUTE", "main.tools.x", "analysts")
    document = first.export()
    second = LocalCatalog(tmp_path / "b.db")
    second.replace_all(document)
    assert second.export() == document
    assert first.dumps(document) == second.dumps(second.export())


def test_an_invalid_import_changes_nothing(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path / "a.db")
    catalog.add_securable("FUNCTION", "main.tools.x")
    catalog.add_principal("analysts", "group")
    catalog.grant("EXECUTE", "main.tools.x", "analysts")
    before = catalog.export()
    bad = {
        "securables": [{"name": "main", "type": "CATALOG"}],
        "grants": [{"principal": "a", "privilege": "EXECUTE", "securable": "main.nowhere.x"}],
    }
    with pytest.raises(ConfigError, match=r"no securable 'main\.nowhere\.x'"):
        catalog.replace_all(bad)
    assert catalog.export() == before


def test_a_privilege_that_does_not_apply_is_refused(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path / "a.db")
    catalog.add_securable("TABLE", "main.sales.orders")
    with pytest.raises(ConfigError, match=r"EXECUTE does not apply to TABLE main\.sales\.orders"):
        catalog.grant("EXECUTE", "main.sales.orders", "x")


class Flaky:
    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    async def privileges(self, principals: Sequence[str], securable_type: str, securable: str) -> frozenset[str]:
        self.calls += 1
        if self.down:
            raise BackendUnavailable("grants", "grant source unavailable")
        return frozenset({"EXECUTE"})

    async def check(self) -> None: ...

    async def close(self) -> None: ...


async def test_the_cache_answers_within_the_ttl_and_asks_again_after() -> None:
    source = Flaky()
    cache = CachedGrants(source, ttl=0.2)
    await cache.privileges(["a"], "FUNCTION", "m.s.f")
    await cache.privileges(["a"], "FUNCTION", "m.s.f")
    assert source.calls == 1
    await asyncio.sleep(0.25)
    await cache.privileges(["a"], "FUNCTION", "m.s.f")
    assert source.calls == 2


async def test_while_the_source_is_down_a_recent_answer_is_used_and_an_old_one_denies() -> None:
    source = Flaky()
    cache = CachedGrants(source, ttl=0.05, max_stale=1.0)
    assert await cache.privileges(["a"], "FUNCTION", "m.s.f") == {"EXECUTE"}
    source.down = True
    await asyncio.sleep(0.1)
    assert await cache.privileges(["a"], "FUNCTION", "m.s.f") == {"EXECUTE"}  # stale but within the bound
    await asyncio.sleep(1.0)
    with pytest.raises(BackendUnavailable, match="grant source unavailable"):
        await cache.privileges(["a"], "FUNCTION", "m.s.f")


async def test_without_any_answer_a_down_source_denies() -> None:
    source = Flaky()
    source.down = True
    with pytest.raises(BackendUnavailable):
        await CachedGrants(source, ttl=30).privileges(["a"], "FUNCTION", "m.s.f")


async def test_invalidate_forgets_everything() -> None:
    source = Flaky()
    cache = CachedGrants(source, ttl=60)
    await cache.privileges(["a"], "FUNCTION", "m.s.f")
    cache.invalidate()
    await cache.privileges(["a"], "FUNCTION", "m.s.f")
    assert source.calls == 2


@pytest.mark.parametrize("failure", ["down", "bad-token"])
async def test_databricks_errors_fail_closed(tmp_path: Path, failure: str) -> None:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config

    from server.grants.databricks import DatabricksGrants

    catalog = LocalCatalog(tmp_path / "c.db")
    catalog.add_securable("FUNCTION", "main.tools.x")
    async with databricks_uc.serve(catalog) as (workspace, host):
        token = "dapi-wrong" if failure == "bad-token" else databricks_uc.TOKEN
        # Built on a worker thread: the SDK fetches host metadata while constructing, and the loop
        # running this test is the one serving the fake.
        client = await asyncio.to_thread(
            lambda: WorkspaceClient(config=Config(host=host, token=token, retry_timeout_seconds=2))
        )
        workspace.down = failure == "down"
        grants = DatabricksGrants(client, timeout=5)
        with pytest.raises(BackendUnavailable, match="grant source unavailable"):
            await grants.privileges([service_principal("bot")], "FUNCTION", "main.tools.x")
        with pytest.raises(BackendUnavailable):
            await grants.check()
