"""`castellan grants` against a running gateway: a revoke takes effect within the cache TTL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess, run_cli, run_gateway
from tests.integration.conftest import deny_body, raw_call

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
TTL = 1.0


def grants_cli(gateway: GatewayProcess, *words: str) -> str:
    done = run_cli(gateway, "grants", *words)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_revoke_takes_effect_within_the_cache_ttl(tmp_path: Path) -> None:
    # The TTL's bound on its own (the catalog watcher, which makes a revoke hold sooner, is off).
    env = {"CASTELLAN_GRANTS__CACHE_TTL_SECONDS": str(TTL), "CASTELLAN_GRANTS__WATCH_SECONDS": "0"}
    with run_gateway(tmp_path / "gw", env) as gw:
        grants_cli(gw, "principal", "add", "bot-7", "--kind", "service_principal")
        grants_cli(gw, "grant", "USE", "CATALOG", "ON", "CATALOG", "main", "TO", "bot-7")
        grants_cli(gw, "grant", "USE", "SCHEMA,", "EXECUTE", "ON", "SCHEMA", "main.tools", "TO", "bot-7")
        token = gw.token("bot-7")  # no groups: only the grants above let it in
        assert (await raw_call(gw, token, "echo", {"text": "granted"}))["isError"] is False
        out = grants_cli(gw, "revoke", "EXECUTE", "ON", "SCHEMA", "main.tools", "FROM", "bot-7")
        assert out.strip() == "REVOKE EXECUTE ON SCHEMA main.tools FROM bot-7"
        revoked_at = time.monotonic()
        while True:
            # The cache entry was made before the revoke, so it is gone TTL after it: a call *sent* later
            # than that must be denied, however long the reply then takes on a loaded machine.
            sent = time.monotonic() - revoked_at
            result = await raw_call(gw, token, "echo", {"text": "after revoke"})
            if result["isError"]:
                break
            assert sent < TTL, f"a call sent {sent:.2f}s after the revoke was still allowed (TTL {TTL}s)"
            await asyncio.sleep(0.05)
        assert deny_body(result)["reasons"] == ["missing privilege EXECUTE on main.tools.echo"]
        shown = grants_cli(gw, "show", "--principal", "bot-7")
        assert "EXECUTE" not in shown
        assert "USE SCHEMA\tmain.tools" in shown


async def test_an_admin_can_invalidate_the_grants_cache_at_once(tmp_path: Path) -> None:
    import aiohttp

    # The catalog watcher (grants.watch_seconds) would drop the cache by itself on the revoke: off here, as
    # with a Databricks workspace, where the admin's invalidation is the way to make a revoke hold at once.
    env = {"CASTELLAN_GRANTS__CACHE_TTL_SECONDS": "3600", "CASTELLAN_GRANTS__WATCH_SECONDS": "0"}
    with run_gateway(tmp_path / "gw", env) as gw:
        grants_cli(gw, "principal", "add", "bot-8", "--kind", "service_principal")
        grants_cli(gw, "grant", "USE", "CATALOG", "ON", "CATALOG", "main", "TO", "bot-8")
        grants_cli(gw, "grant", "USE", "SCHEMA,", "EXECUTE", "ON", "SCHEMA", "main.tools", "TO", "bot-8")
        token = gw.token("bot-8")
        assert (await raw_call(gw, token, "echo", {"text": "granted"}))["isError"] is False
        grants_cli(gw, "revoke", "EXECUTE", "ON", "SCHEMA", "main.tools", "FROM", "bot-8")
        assert (await raw_call(gw, token, "echo", {"text": "cached"}))["isError"] is False  # an hour-long TTL
        url = f"{gw.base_url}/admin/grants/invalidate"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, headers={"authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 403  # no admin scope
            admin = gw.token("ops", scopes=["castellan:admin"])
            async with session.post(url, headers={"authorization": f"Bearer {admin}"}) as resp:
                assert resp.status == 200
            async with session.post(url) as resp:
                assert resp.status == 401
        body = deny_body(await raw_call(gw, token, "echo", {"text": "after invalidate"}))
        assert body["reasons"] == ["missing privilege EXECUTE on main.tools.echo"]


async def test_an_agent_or_subject_named_like_a_group_gets_none_of_its_grants(tmp_path: Path) -> None:
    """The demo group `admins` holds ALL PRIVILEGES on `main`. A token whose agent id, or whose subject,
    is `admins` is a service principal or a user called that, not the group: it is refused; a token
    that names the group in its `groups` claim is let in."""
    with run_gateway(tmp_path / "gw") as gw:
        for token in (gw.token("admins"), gw.token("bot-3", subject="admins")):
            body = deny_body(await raw_call(gw, token, "echo", {"text": "as admins?"}))
            assert body["stage"] == "grants"
            assert body["reasons"] == [
                "missing privilege USE CATALOG on main",
                "missing privilege USE SCHEMA on main.tools",
                "missing privilege EXECUTE on main.tools.echo",
            ]
        member = await raw_call(gw, gw.token("bot-3", ["admins"]), "echo", {"text": "as a member"})
        assert member["isError"] is False
        # The admin CLI types principals the same way: what each kind called `admins` holds.
        as_group = grants_cli(gw, "show", "--principal", "admins", "--securable", "main.tools.echo", "--effective")
        assert "EXECUTE\tmain.tools.echo" in as_group
        as_agent = grants_cli(
            gw, "show", "--principal", "admins", "--kind", "service_principal", "--securable", "main.tools.echo",
            "--effective",
        )  # fmt: skip
        assert "EXECUTE" not in as_agent
        listed = grants_cli(gw, "principal", "list")
        assert "admins\tgroup" in listed.splitlines()


def test_a_grant_to_an_unknown_principal_is_refused_with_the_fix(tmp_path: Path) -> None:
    with run_gateway(tmp_path / "gw") as gw:
        done = run_cli(gw, "grants", "grant", "EXECUTE", "ON", "SCHEMA", "main.tools", "TO", "ghost")
        assert done.returncode != 0
        assert "no principal 'ghost'" in done.stderr
        assert "castellan grants principal add ghost --kind" in done.stderr
        out = grants_cli(gw, "grant", "--kind", "group", "EXECUTE", "ON", "SCHEMA", "main.tools", "TO", "ghost")
        assert out.strip() == "GRANT EXECUTE ON SCHEMA main.tools TO ghost"
        assert "ghost\tgroup" in grants_cli(gw, "principal", "list").splitlines()
