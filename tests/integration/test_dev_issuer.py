"""The demo gateway's own OAuth issuer: the official Python SDK's OAuth client signs in with no hand-minted
token (discovery, dynamic registration or a client ID metadata document, code + PKCE, refresh, step-up),
and headless agents use client credentials. The sign-in page is driven with plain HTTP, as a person would
click it."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
import pytest
from mcp.client.auth import OAuthClientProvider
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

from tests.gateway_process import GatewayProcess, free_port, run_gateway
from tests.oauth_clients import MemoryStorage, tool_text
from tests.oauth_clients import claims as jwt_claims

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(300)]

STEP_UP_TOOL = "clock.now"
STEP_UP_SCOPE = "demo:clock"
REDIRECT = "http://127.0.0.1:1/callback"  # never fetched: the callback handler reads the redirect


class SignInPage:
    """A person at the dev sign-in page: opens it, picks an identity, ticks scopes, submits."""

    def __init__(self) -> None:
        self.pages: list[str] = []
        self.redirects: list[str] = []

    async def sign_in(self, url: str, identity: str, untick: tuple[str, ...] = ()) -> str:
        query = parse_qs(urlsplit(url).query)
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 200, await resp.text()
                self.pages.append(await resp.text())
            form = [(k, v[0]) for k, v in query.items()]
            form += [("identity", identity), ("decision", "allow")]
            form += [("grant_scope", s) for s in (query.get("scope", [""])[0]).split() if s not in untick]
            action = url.split("?", 1)[0]
            async with session.post(action, data=form, allow_redirects=False) as resp:
                assert resp.status == 302, await resp.text()
                location = resp.headers["Location"]
        self.redirects.append(location)
        return location

    def callback(self) -> AuthorizationCodeResult:
        query = parse_qs(urlsplit(self.redirects[-1]).query)
        assert "code" in query, self.redirects[-1]
        return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query.get("iss", [None])[0])


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (where a client hosts its metadata document)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tls: tuple[Path, Path]) -> Iterator[GatewayProcess]:
    env = {
        "CASTELLAN_AUTH__TOOL_SCOPES": json.dumps({STEP_UP_TOOL: [STEP_UP_SCOPE]}),
        "SSL_CERT_FILE": str(tls[0]),  # the gateway trusts the metadata documents' test certificate
        "CASTELLAN_AUTH__DEV_ISSUER_PRIVATE_DOCUMENTS": "true",  # they are hosted on 127.0.0.1
    }
    with run_gateway(tmp_path_factory.mktemp("gateway"), env, timeout=120) as gw:
        yield gw


@contextlib.contextmanager
def document_host(tls: tuple[Path, Path], documents: dict[str, dict[str, Any]]) -> Iterator[str]:
    """An HTTPS server on loopback serving client ID metadata documents (`{path: document}`)."""
    port = free_port()
    base = f"https://127.0.0.1:{port}"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            document = documents.get(self.path)
            if document is None:
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps(document).replace("{base}", base).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls[0], tls[1])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()


def _provider(
    gateway: GatewayProcess, page: SignInPage, storage: MemoryStorage, untick: list[tuple[str, ...]], **kwargs: Any
) -> OAuthClientProvider:
    async def redirect_handler(url: str) -> None:
        await page.sign_in(url, "alice", untick.pop(0) if untick else ())

    async def callback_handler() -> AuthorizationCodeResult:
        return page.callback()

    return OAuthClientProvider(
        server_url=gateway.mcp_url,
        client_metadata=OAuthClientMetadata(
            client_name="castellan dev-issuer test",
            redirect_uris=[REDIRECT],
            grant_types=["authorization_code", "refresh_token"],
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
        **kwargs,
    )


async def test_the_official_client_signs_in_at_the_demo_gateways_own_issuer_refreshes_and_steps_up(
    gateway: GatewayProcess,
) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{gateway.base_url}/.well-known/oauth-protected-resource/mcp") as r:
        assert (await r.json())["authorization_servers"] == [gateway.base_url]
    page, storage = SignInPage(), MemoryStorage()
    challenges: list[tuple[int, str]] = []
    provider = _provider(gateway, page, storage, untick=[(STEP_UP_SCOPE,)])

    async def record(response: httpx2.Response) -> None:
        if response.request.url.path == "/mcp" and response.status_code in (401, 403):
            challenges.append((response.status_code, response.headers.get("www-authenticate", "")))

    http = create_mcp_http_client(auth=provider)
    http.event_hooks["response"].append(record)
    async with http, Client(streamable_http_client(gateway.mcp_url, http_client=http)) as client:
        # 1. 401 → protected resource metadata → the gateway's own issuer → registration → sign-in page.
        assert await tool_text(client, "echo") == "hello"
        assert challenges[0][0] == 401
        assert "Development only" in page.pages[0]
        assert storage.client is not None
        registered = storage.client.client_id
        assert registered.startswith("castellan-dev-issuer-test-")
        first = storage.tokens
        assert first is not None
        assert first.refresh_token
        claims = jwt_claims(first.access_token)
        assert claims["iss"] == gateway.base_url  # a real issuer, not the placeholder `castellan-dev`
        assert (claims["sub"], claims["agent_id"], claims["groups"]) == ("alice", registered, ["analysts"])
        assert claims["aud"] == gateway.mcp_url
        assert STEP_UP_SCOPE not in claims["scope"].split()  # asked for, unticked at sign-in
        assert parse_qs(urlsplit(page.redirects[0]).query)["iss"] == [gateway.base_url]  # RFC 9207

        # 2. Refresh once the access token has expired: no new sign-in; the used refresh token is spent.
        provider.context.token_expiry_time = time.time() - 1
        assert await tool_text(client, "echo") == "hello"
        assert storage.tokens is not None
        assert storage.tokens.access_token != first.access_token
        assert storage.tokens.refresh_token != first.refresh_token
        assert len(page.pages) == 1
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{gateway.base_url}/oauth2/token",
                data={"grant_type": "refresh_token", "refresh_token": first.refresh_token, "client_id": registered},
            ) as resp,
        ):
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_grant"

        # 3. Step-up: the tool needs a scope the token lacks: HTTP 403 insufficient_scope; the client signs
        #    in again (this time the scope is ticked) and the retried call runs.
        assert await tool_text(client, STEP_UP_TOOL)
        status, challenge = challenges[-1]
        assert status == 403
        assert 'error="insufficient_scope"' in challenge
        assert STEP_UP_SCOPE in challenge
        assert len(page.pages) == 2
        assert STEP_UP_SCOPE in jwt_claims(storage.tokens.access_token)["scope"].split()


async def test_a_client_id_metadata_document_signs_in_without_registering(
    gateway: GatewayProcess, tls: tuple[Path, Path]
) -> None:
    document = {
        "client_id": "{base}/client.json",
        "client_name": "Metadata-document client",
        "redirect_uris": [REDIRECT],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    with document_host(tls, {"/client.json": document}) as base:
        page, storage = SignInPage(), MemoryStorage()
        provider = _provider(gateway, page, storage, untick=[], client_metadata_url=f"{base}/client.json")
        http = create_mcp_http_client(auth=provider)
        async with http, Client(streamable_http_client(gateway.mcp_url, http_client=http)) as client:
            assert await tool_text(client, "echo") == "hello"
    assert storage.client is not None
    assert storage.client.client_id == f"{base}/client.json"  # no dynamic registration
    assert "Metadata-document client" in page.pages[0]
    assert storage.tokens is not None
    claims = jwt_claims(storage.tokens.access_token)
    assert (claims["client_id"], claims["sub"]) == (f"{base}/client.json", "alice")


async def test_a_metadata_document_that_names_another_client_is_refused(
    gateway: GatewayProcess, tls: tuple[Path, Path]
) -> None:
    forged = {"client_id": "https://elsewhere.example/client.json", "redirect_uris": [REDIRECT]}
    with document_host(tls, {"/forged.json": forged}) as base:
        url = (
            f"{gateway.base_url}/oauth2/authorize?response_type=code&client_id={base}/forged.json"
            f"&redirect_uri={REDIRECT}&code_challenge={'a' * 43}&code_challenge_method=S256&state=s"
        )
        async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False) as resp:
            assert resp.status == 400
            assert "not the URL it was fetched from" in await resp.text()


async def test_a_headless_demo_agent_signs_in_with_client_credentials(gateway: GatewayProcess) -> None:
    secrets = json.loads((gateway.data_dir / "dev-issuer-agents.json").read_text())
    async with aiohttp.ClientSession() as s:
        auth = aiohttp.BasicAuth("demo-agent", secrets["demo-agent"])
        form = {"grant_type": "client_credentials", "resource": gateway.mcp_url}
        async with s.post(f"{gateway.base_url}/oauth2/token", data=form, auth=auth) as resp:
            assert resp.status == 200, await resp.text()
            token = (await resp.json())["access_token"]
        wrong = aiohttp.BasicAuth("demo-agent", "not-the-secret")
        async with s.post(f"{gateway.base_url}/oauth2/token", data=form, auth=wrong) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_client"
    claims = jwt_claims(token)
    assert (claims["sub"], claims["agent_id"], claims["groups"]) == ("demo-agent", "demo-agent", ["analysts"])
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(gateway.mcp_url, http_client=http)) as client:
        assert await tool_text(client, "echo") == "hello"
    # `castellan token` keeps working beside it: same key, same issuer.
    minted = gateway.token("cli-agent", ["analysts"])
    assert jwt_claims(minted)["iss"] == claims["iss"] == gateway.base_url


def test_check_config_in_production_refuses_the_dev_issuer_even_when_overridden(tmp_path: Path) -> None:
    import os

    from server.production import CHECKS
    from tests.gateway_process import castellan, gateway_env

    env = {
        **os.environ,
        **gateway_env(tmp_path, free_port()),
        "CASTELLAN_ENVIRONMENT": "production",
        "CASTELLAN_PRODUCTION_OVERRIDES": json.dumps(sorted(CHECKS)),  # every check waived, knowingly
    }
    done = castellan("check-config", env=env, timeout=120)
    assert done.returncode == 1
    assert "auth.dev_issuer: the dev issuer lets anyone" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("check-config: failed")
    off = castellan("check-config", env={**env, "CASTELLAN_AUTH__DEV_ISSUER": "false"}, timeout=120)
    assert "FAILED  settings" not in off.stdout, off.stdout
