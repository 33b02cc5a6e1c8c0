"""Agents sign in with OAuth: the official Python SDK's OAuth client provider, the gateway and a real
authorization server (Ory Hydra, tests/hydra.py) go through the whole MCP authorization flow."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import anyio
import httpx2
import pytest
from mcp.client.auth import OAuthClientProvider
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

from bench.load import call_body, call_headers
from tests.gateway_process import GatewayProcess, free_port, run_gateway
from tests.hydra import Hydra, HydraLogin, User, run_hydra
from tests.oauth_clients import MemoryStorage, tool_text
from tests.oauth_clients import claims as jwt_claims

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(300)]

BASE_SCOPE = "mcp:tools"
ADMIN_SCOPE = "castellan:admin-tools"
STEP_UP_TOOL = "clock.now"


@pytest.fixture(scope="module")
def hydra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hydra]:
    with run_hydra(tmp_path_factory.mktemp("hydra"), scopes=[BASE_SCOPE, ADMIN_SCOPE]) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, hydra: Hydra) -> Iterator[GatewayProcess]:
    env = {
        "CASTELLAN_AUTH__MODE": "jwt",
        "CASTELLAN_AUTH__ISSUER": hydra.issuer,
        "CASTELLAN_AUTH__JWKS_URL": hydra.jwks_url,
        "CASTELLAN_AUTH__REQUIRED_SCOPES": json.dumps([BASE_SCOPE]),
        "CASTELLAN_AUTH__TOOL_SCOPES": json.dumps({STEP_UP_TOOL: [ADMIN_SCOPE]}),
    }
    with run_gateway(tmp_path_factory.mktemp("gateway"), env, timeout=120) as gw:
        yield gw


async def test_the_official_client_signs_in_calls_refreshes_and_steps_up(hydra: Hydra, gateway: GatewayProcess) -> None:
    alice = User("alice", groups=("analysts",), allowed_scopes={BASE_SCOPE})
    login = HydraLogin(hydra, {"alice": alice})
    storage = MemoryStorage()
    redirects: list[str] = []
    challenges: list[tuple[int, str]] = []

    async def redirect_handler(url: str) -> None:
        redirects.append(await login.authorize(url, as_user="alice"))

    async def callback_handler() -> AuthorizationCodeResult:
        query = parse_qs(urlsplit(redirects[-1]).query)
        assert "code" in query, redirects[-1]
        return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query.get("iss", [None])[0])

    provider = OAuthClientProvider(
        server_url=gateway.mcp_url,
        client_metadata=OAuthClientMetadata(
            client_name="castellan-oauth-test",
            redirect_uris=["http://127.0.0.1:1/callback"],  # never fetched: the callback handler reads it
            grant_types=["authorization_code", "refresh_token"],
        ),
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )

    async def record(response: httpx2.Response) -> None:
        if response.request.url.path == "/mcp" and response.status_code in (401, 403):
            challenges.append((response.status_code, response.headers.get("www-authenticate", "")))

    http = create_mcp_http_client(auth=provider)
    http.event_hooks["response"].append(record)
    async with http, Client(streamable_http_client(gateway.mcp_url, http_client=http)) as client:
        # 1. Discovery (401 → protected resource metadata → Hydra's metadata), registration, code + PKCE.
        assert await tool_text(client, "echo") == "hello"
        assert challenges[0][0] == 401
        assert "resource_metadata=" in challenges[0][1]
        assert storage.client is not None
        assert storage.client.client_id
        first = storage.tokens
        assert first is not None
        assert first.refresh_token
        claims = jwt_claims(first.access_token)
        assert claims["iss"] == hydra.issuer
        assert claims["sub"] == "alice"
        assert gateway.mcp_url in claims["aud"]
        assert claims["groups"] == ["analysts"]
        assert ADMIN_SCOPE not in claims["scope"].split()  # asked for, not granted: alice may not yet
        assert ADMIN_SCOPE in login.consents[0]["requested_scope"]

        # 2. Refresh: once the access token has expired the client refreshes it, without a new sign-in.
        provider.context.token_expiry_time = time.time() - 1
        assert await tool_text(client, "echo") == "hello"
        assert storage.tokens is not None
        assert storage.tokens.access_token != first.access_token
        assert len(login.consents) == 1

        # 3. Step-up: the tool needs a scope the token lacks: 403 insufficient_scope naming it; the
        #    client re-authorizes (alice is now allowed it) and the retried call runs.
        alice.allowed_scopes.add(ADMIN_SCOPE)
        assert await tool_text(client, STEP_UP_TOOL)
        status, challenge = challenges[-1]
        assert status == 403
        assert 'error="insufficient_scope"' in challenge
        assert f'scope="{BASE_SCOPE} {ADMIN_SCOPE}"' in challenge
        assert len(login.consents) == 2
        assert ADMIN_SCOPE in jwt_claims(storage.tokens.access_token)["scope"].split()


async def test_a_token_without_the_tools_scope_gets_403_naming_it_not_a_tool_result(
    hydra: Hydra, gateway: GatewayProcess
) -> None:
    token = _client_credentials(hydra, gateway, scope=BASE_SCOPE)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.mcp_url, data=call_body(STEP_UP_TOOL, {}, 1), headers=call_headers(STEP_UP_TOOL, token)
        ) as resp,
    ):
        assert resp.status == 403
        challenge = resp.headers["WWW-Authenticate"]
        answer = await resp.json()
    assert 'error="insufficient_scope"' in challenge
    assert ADMIN_SCOPE in challenge
    assert "resource_metadata=" in challenge
    assert ADMIN_SCOPE in answer["error"]["message"]


async def test_a_headless_agent_signs_in_with_client_credentials(hydra: Hydra, gateway: GatewayProcess) -> None:
    token = _client_credentials(hydra, gateway, scope=BASE_SCOPE)
    claims = jwt_claims(token)
    assert claims["sub"] == claims["client_id"]  # the agent itself: a service principal
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(gateway.mcp_url, http_client=http)) as client:
        listed = await client.list_tools()
    assert listed.tools is not None


def _client_credentials(hydra: Hydra, gateway: GatewayProcess, scope: str) -> str:
    """A service's token from Hydra (client credentials; Hydra names the resource with `audience`)."""
    from authlib.integrations.requests_client import OAuth2Session

    client = hydra.create_client(
        grant_types=["client_credentials"],
        scope=scope,
        audience=[gateway.mcp_url],
        token_endpoint_auth_method="client_secret_basic",
    )
    with OAuth2Session(client["client_id"], client["client_secret"], scope=scope) as session:
        token = session.fetch_token(hydra.token_url, grant_type="client_credentials", audience=gateway.mcp_url)
    return str(token["access_token"])


async def test_castellan_connect_signs_in_once_then_refreshes_its_expired_token_by_itself(
    hydra: Hydra, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """The desktop bridge as a desktop agent runs it (the official SDK's stdio client spawning
    `castellan connect --sign-in`): the first run signs in through the browser (driven headlessly here:
    the bridge prints the URL, the "browser" signs in and lands on the bridge's loopback callback);
    a later run, after the stored access token expired, refreshes it without asking anyone."""
    login = HydraLogin(hydra, {"carol": User("carol", groups=("analysts",), allowed_scopes={BASE_SCOPE})})
    store, errlog = tmp_path / "connect.json", tmp_path / "connect.log"
    port = free_port()
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            *("-m", "server", "connect", gateway.mcp_url, "--sign-in"),
            *("--token-store", str(store), "--callback-port", str(port)),
        ],
        env={**os.environ, "BROWSER": "true"},  # no real browser: `true` is the one webbrowser runs
    )

    async def browser() -> None:
        deadline = time.monotonic() + 60
        while "sign in at " not in errlog.read_text() and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.2)
        url = errlog.read_text().split("sign in at ", 1)[1].split()[0]
        callback = await login.authorize(url, as_user="carol")
        assert callback.startswith(f"http://127.0.0.1:{port}/callback?")
        async with aiohttp.ClientSession() as session, session.get(callback) as resp:
            assert resp.status == 200

    with errlog.open("w") as err:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(browser)
            async with Client(stdio_client(params, errlog=err)) as client:
                assert await tool_text(client, "echo") == "hello"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    first = json.loads(store.read_text())
    assert first["tokens"]["refresh_token"]
    assert len(login.consents) == 1

    first["expires_at"] = time.time() - 60  # the access token has expired since
    store.write_text(json.dumps(first))
    with errlog.open("w") as err, anyio.fail_after(120):  # were it to ask for a sign-in, it would wait
        async with Client(stdio_client(params, errlog=err)) as client:
            assert await tool_text(client, "echo") == "hello"
    assert "sign in at" not in errlog.read_text()
    refreshed = json.loads(store.read_text())
    assert refreshed["tokens"]["access_token"] != first["tokens"]["access_token"]
    assert refreshed["expires_at"] > time.time()
    assert len(login.consents) == 1  # nobody was asked again
