"""Upstream servers get each user's own credential, never the agent's token.

Real parts: Ory Hydra (the users' sign-in, tests/hydra.py), `castellan sts` (RFC 8693 token exchange,
server/credentials/sts.py), the gateway, and a third-party MCP server that demands a valid token on
every request and logs what reached its wire (tests/fixtures/token_upstream.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway_process import GatewayProcess, free_port, run_gateway, stop
from tests.hydra import Hydra, HydraLogin, User, run_hydra, user_token
from tests.integration.conftest import raw_call, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(300)]

GATEWAY_AUDIENCE = "http://castellan.gateway.test/mcp"
STS_SECRET = "sts-client-secret-for-tests-0123456789"
SERVICE_TOKEN = "gateway-service-token-for-discovery"
BROKER_SECRET = "broker-client-secret-for-tests-0123456789"


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


@contextmanager
def _process(argv: list[str], url: str, what: str, env: dict[str, str] | None = None) -> Iterator[None]:
    process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    try:
        _wait_http(url, process, what)
        yield
    finally:
        stop(process)


@dataclass
class World:
    hydra: Hydra
    login: HydraLogin
    gateway: GatewayProcess
    upstream_audience: str
    wire_log: Path
    saas_audience: str
    saas_wire: Path

    def wire(self, log: Path | None = None) -> list[str]:
        lines = (log or self.wire_log).read_text().splitlines()
        return [json.loads(line)["authorization"] for line in lines]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("creds")
    with run_hydra(tmp / "hydra", scopes=["mcp:tools", "saas:read"]) as hydra:
        sts_port, up_port, saas_port = free_port(), free_port(), free_port()
        sts_url, up_url = f"http://127.0.0.1:{sts_port}", f"http://127.0.0.1:{up_port}/mcp"
        saas_url = f"http://127.0.0.1:{saas_port}/mcp"
        (tmp / "sts.toml").write_text(
            f"""
issuer = "{sts_url}"
key_file = "{tmp / "sts-key.json"}"
token_ttl_seconds = 300
[subject]
issuer = "{hydra.issuer}"
jwks_url = "{hydra.jwks_url}"
audience = "{GATEWAY_AUDIENCE}"
[clients.castellan-gateway]
secret = {{ env = "STS_CLIENT_SECRET" }}
audiences = ["{up_url}"]
[audiences."{up_url}"]
scopes = ["inventory:read", "inventory:write"]
groups = {{ analysts = ["inventory:read"], inventory-admins = ["inventory:read", "inventory:write"] }}
"""
        )
        sts = [sys.executable, "-m", "server", "sts", "--config", str(tmp / "sts.toml"), "--port", str(sts_port)]
        wire_log = tmp / "wire.jsonl"
        wire_log.touch()
        upstream = [
            *(sys.executable, "-m", "tests.fixtures.token_upstream", "--port", str(up_port)),
            *("--jwks", f"{sts_url}/.well-known/jwks.json", "--audience", up_url, "--wire-log", str(wire_log)),
        ]
        inventory = {
            "name": "inventory",
            "url": up_url,
            "token_env": "UPSTREAM_SERVICE_TOKEN",
            "credential": "token_exchange",
            "token_exchange": {
                "token_url": f"{sts_url}/token",
                "client_id": "castellan-gateway",
                "client_secret": {"env": "STS_CLIENT_SECRET"},
            },
        }
        saas_wire = tmp / "saas-wire.jsonl"
        saas_wire.touch()
        saas_upstream = [
            *(sys.executable, "-m", "tests.fixtures.token_upstream", "--port", str(saas_port)),
            *("--jwks", hydra.jwks_url, "--audience", saas_url, "--wire-log", str(saas_wire)),
        ]
        saas = {  # a SaaS behind its own authorization server (Hydra here): each user authorizes it once
            "name": "saas",
            "url": saas_url,
            "token_env": "UPSTREAM_SERVICE_TOKEN",
            "credential": "brokered",
            "oauth": {
                "authorize_url": f"{hydra.issuer}/oauth2/auth",
                "token_url": hydra.token_url,
                "client_id": "castellan-broker",
                "client_secret": {"env": "BROKER_SECRET"},
                "scopes": ["saas:read", "offline_access"],
            },
        }
        env = {
            "CASTELLAN_AUTH__MODE": "jwt",
            "CASTELLAN_AUTH__ISSUER": hydra.issuer,
            "CASTELLAN_AUTH__JWKS_URL": hydra.jwks_url,
            "CASTELLAN_AUTH__AUDIENCE": GATEWAY_AUDIENCE,
            "CASTELLAN_UPSTREAMS": json.dumps([inventory, saas]),
            "BROKER_SECRET": BROKER_SECRET,
            "CASTELLAN_GRANTS__CACHE_TTL_SECONDS": "0",
            "STS_CLIENT_SECRET": STS_SECRET,
            "UPSTREAM_SERVICE_TOKEN": SERVICE_TOKEN,
        }
        with (
            _process(sts, f"{sts_url}/.well-known/jwks.json", "castellan sts", {"STS_CLIENT_SECRET": STS_SECRET}),
            _process(upstream, up_url, "the upstream", {"UPSTREAM_SERVICE_TOKEN": SERVICE_TOKEN}),
            _process(saas_upstream, saas_url, "the saas upstream", {"UPSTREAM_SERVICE_TOKEN": SERVICE_TOKEN}),
            run_gateway(tmp / "gw", env, timeout=120) as gateway,
        ):
            for group in ("analysts", "inventory-admins", "marketing"):
                if group != "analysts":
                    added = run_cli(gateway, "grants", "principal", "add", group, "--kind", "group")
                    assert added.returncode == 0, added.stderr
                statements = ["USE SCHEMA ON SCHEMA main.upstream", "EXECUTE ON SCHEMA main.upstream"]
                for statement in statements if group == "analysts" else ["USE CATALOG ON CATALOG main", *statements]:
                    done = run_cli(gateway, "grants", "grant", *statement.split(), "TO", group)
                    assert done.returncode == 0, done.stderr
            hydra.create_client(  # the gateway's client at the SaaS's authorization server
                client_id="castellan-broker",
                client_secret=BROKER_SECRET,
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                redirect_uris=[f"{gateway.base_url}/oauth/callback"],
                scope="saas:read offline_access offline",
                audience=[saas_url],
                token_endpoint_auth_method="client_secret_basic",
            )
            users = {
                "alice": User("alice", groups=("analysts",), allowed_scopes={"mcp:tools", "saas:read"}),
                "bob": User("bob", groups=("inventory-admins",), allowed_scopes={"mcp:tools", "saas:read"}),
            }
            yield World(hydra, HydraLogin(hydra, users), gateway, up_url, wire_log, saas_url, saas_wire)


async def _call(world: World, token: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:  # the upstream's tools appear at the gateway's first refresh
        result = await raw_call(world.gateway, token, tool, arguments)
        if not (result.get("isError") and "unknown tool" in json.dumps(result)) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.3)


async def test_two_users_reach_the_upstream_with_their_own_exchanged_tokens_never_the_agents(world: World) -> None:
    alice = await user_token(world.hydra, world.login, "alice", GATEWAY_AUDIENCE, "mcp:tools")
    bob = await user_token(world.hydra, world.login, "bob", GATEWAY_AUDIENCE, "mcp:tools")

    seen_by_upstream = {}
    for name, token in (("alice", alice), ("bob", bob)):
        result = await _call(world, token, "inventory.whoami", {})
        assert not result.get("isError"), result
        seen_by_upstream[name] = result["structuredContent"]

    assert seen_by_upstream["alice"]["sub"] == "alice"
    assert seen_by_upstream["bob"]["sub"] == "bob"
    # Scoped per user, for this upstream's audience, issued by the token service to the gateway as actor.
    assert seen_by_upstream["alice"]["scope"] == "inventory:read"
    assert seen_by_upstream["bob"]["scope"] == "inventory:read inventory:write"
    for claims in seen_by_upstream.values():
        assert claims["aud"] == world.upstream_audience
        assert claims["act"] == {"sub": "castellan-gateway"}

    # The scope is the upstream's to enforce: bob may restock, alice may not.
    restocked = await _call(world, bob, "inventory.restock", {"product": "widget"})
    assert restocked["content"][0]["text"] == "restocked widget"
    refused = await _call(world, alice, "inventory.restock", {"product": "widget"})
    assert refused["isError"] is True

    # On the wire: the service token (connect, list) and exchanged tokens; never an agent's token.
    wire = world.wire()
    assert f"Bearer {SERVICE_TOKEN}" in wire
    assert all(alice not in header and bob not in header for header in wire)
    exchanged = {h for h in wire if h and h != f"Bearer {SERVICE_TOKEN}"}
    assert len(exchanged) >= 2


async def test_a_token_the_service_will_not_exchange_denies_the_call_before_it_leaves(world: World) -> None:
    carol_login = HydraLogin(world.hydra, {"carol": User("carol", groups=("marketing",), allowed_scopes={"mcp:tools"})})
    carol = await user_token(world.hydra, carol_login, "carol", GATEWAY_AUDIENCE, "mcp:tools")
    before = len(world.wire())
    result = await _call(world, carol, "inventory.whoami", {})
    assert result["isError"] is True
    assert "token exchange refused: invalid_scope" in json.dumps(result)
    assert len(world.wire()) == before  # nothing was sent upstream for her


async def test_policy_sees_which_credential_an_upstream_call_carries(world: World) -> None:
    alice = await user_token(world.hydra, world.login, "alice", GATEWAY_AUDIENCE, "mcp:tools")
    assert not (await _call(world, alice, "inventory.whoami", {})).get("isError")
    log = world.gateway.data_dir / "decisions.jsonl"
    for _ in range(100):  # the decision log's buffer is flushed within a second: a bounded wait for the line
        if "inventory.whoami" in log.read_text():
            break
        await asyncio.sleep(0.1)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    upstream_inputs = [e["input"].get("upstream") for e in events if e["input"]["tool"]["name"] == "inventory.whoami"]
    assert {"name": "inventory", "credential": "token_exchange"} in upstream_inputs
    local = [e["input"] for e in events if e["input"]["tool"]["name"] == "echo"]
    assert all("upstream" not in i for i in local)


def test_check_config_says_where_each_credential_comes_from_without_printing_it(world: World) -> None:
    # check-config builds every backend and reaches each: slow on a loaded machine, hence its own timeout
    shown = run_cli(world.gateway, "check-config", timeout=180)
    assert "credential inventory: token exchange (RFC 8693)" in shown.stdout, shown.stdout
    assert "secret from env STS_CLIENT_SECRET" in shown.stdout
    assert STS_SECRET not in shown.stdout
    assert SERVICE_TOKEN not in shown.stdout


async def _authorize(world: World, user: str, refusal: dict[str, Any]) -> None:
    """Follow the link the refusal names, sign in as `user` at the SaaS's authorization server, land on
    the gateway's callback (as the user's browser does)."""
    text = json.dumps(refusal)
    assert f"needs {user}'s own authorization: open " in text, text
    link = re.search(r"open (http\S+?)(?:\\|\"|$)", text)
    assert link is not None, text
    callback = await world.login.authorize(link.group(1), as_user=user)
    assert callback.startswith(f"{world.gateway.base_url}/oauth/callback?")
    async with aiohttp.ClientSession() as browser, browser.get(callback) as resp:
        answer = await resp.text()
    assert resp.status == 200, answer
    assert f"saas is authorized for {user}" in answer
    async with aiohttp.ClientSession() as browser, browser.get(callback) as resp:
        assert resp.status == 400  # a link works once


async def test_each_user_authorizes_a_brokered_upstream_once_and_revoking_one_stops_only_that_user(
    world: World,
) -> None:
    tokens = {u: await user_token(world.hydra, world.login, u, GATEWAY_AUDIENCE, "mcp:tools") for u in ("alice", "bob")}
    for user, token in tokens.items():
        refused = await _call(world, token, "saas.whoami", {})
        assert refused["isError"] is True
        await _authorize(world, user, refused)
        seen = await _call(world, token, "saas.whoami", {})
        assert not seen.get("isError"), seen
        assert seen["structuredContent"]["sub"] == user  # the user's own grant at the SaaS
        assert seen["structuredContent"]["aud"] == [world.saas_audience]
        assert "saas:read" in seen["structuredContent"]["scope"].split()

    listed = run_cli(world.gateway, "credentials", "list")
    assert listed.returncode == 0, listed.stderr
    assert "saas\talice" in listed.stdout
    assert "saas\tbob" in listed.stdout
    assert "ory_at_" not in listed.stdout
    assert "eyJ" not in listed.stdout

    # The access token expires: the gateway refreshes it with the sealed refresh token, no new sign-in.
    first = world.wire(world.saas_wire)[-1]
    with sqlite3.connect(world.gateway.data_dir / "credentials.db") as db:
        db.execute("UPDATE grants SET access_expires_at = 0 WHERE subject = 'alice'")
    assert (await _call(world, tokens["alice"], "saas.whoami", {}))["structuredContent"]["sub"] == "alice"
    assert world.wire(world.saas_wire)[-1] != first

    revoked = run_cli(world.gateway, "credentials", "revoke", "--subject", "alice", "--upstream", "saas")
    assert revoked.returncode == 0, revoked.stderr
    again = await _call(world, tokens["alice"], "saas.whoami", {})
    assert again["isError"] is True
    assert "needs alice's own authorization" in json.dumps(again)
    still = await _call(world, tokens["bob"], "saas.whoami", {})
    assert still["structuredContent"]["sub"] == "bob"

    # Sealed at rest: no token appears in the database file in clear.
    raw = (world.gateway.data_dir / "credentials.db").read_bytes()
    assert all(h.removeprefix("Bearer ").encode() not in raw for h in world.wire(world.saas_wire) if h)
    # And the agents' own tokens never reached the SaaS either.
    assert all(t not in h for t in tokens.values() for h in world.wire(world.saas_wire))
