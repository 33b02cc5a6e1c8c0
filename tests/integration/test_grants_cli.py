"""`castellan grants` against a running gateway: a revoke takes effect within the cache TTL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.testing import GatewayProcess, run_gateway
from tests.integration.conftest import deny_body, raw_call

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
TTL = 1.0


def grants_cli(gateway: GatewayProcess, *words: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "server", "grants", *words],
        env=gateway.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_revoke_takes_effect_within_the_cache_ttl(tmp_path: Path) -> None:
    env = {"CASTELLAN_GRANTS__CACHE_TTL_SECONDS": str(TTL)}
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

    env = {"CASTELLAN_GRANTS__CACHE_TTL_SECONDS": "3600"}
    with run_gateway(tmp_path / "gw", env) as gw:
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
