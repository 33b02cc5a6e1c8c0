"""What reaches the HTTP edge before MCP: each bad request rejected with the right status and message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import aiohttp
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from tests.gateway_process import GatewayProcess

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def dev_key(gateway: GatewayProcess) -> ECKey:
    return ECKey.import_key(json.loads((gateway.data_dir / "dev-signing-key.json").read_text()))


def claims(gateway: GatewayProcess, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {"iss": gateway.issuer, "aud": gateway.mcp_url, "sub": "x", "agent_id": "x", "exp": now + 300}
    values.update(overrides)
    return values


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def post(
    gateway: GatewayProcess, body: Any = INIT, token: str | None = None, **headers: str
) -> tuple[int, dict[str, str], str]:
    all_headers = {**HEADERS, **headers}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, s.post(gateway.mcp_url, data=data, headers=all_headers) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_no_token_is_401_pointing_to_the_resource_metadata(gateway: GatewayProcess) -> None:
    status, headers, body = await post(gateway)
    assert status == 401
    metadata_url = f"{gateway.base_url}/.well-known/oauth-protected-resource/mcp"
    assert headers["WWW-Authenticate"] == f'Bearer resource_metadata="{metadata_url}"'
    message = json.loads(body)["error"]["message"]
    assert message.startswith("unauthorized: bearer token required; dev mode: mint a token with `castellan token")
    assert f"--url {gateway.mcp_url}" in message
    async with aiohttp.ClientSession() as s, s.get(metadata_url) as resp:
        document = await resp.json()
    assert document["resource"] == gateway.mcp_url
    assert document["authorization_servers"] == [gateway.base_url]  # the dev issuer, not a placeholder


async def test_a_valid_token_opens_a_session(gateway: GatewayProcess) -> None:
    status, headers, _ = await post(gateway, token=gateway.token("edge-bot", ["analysts"]))
    assert status == 200
    assert headers.get("mcp-session-id")


def forged(gateway: GatewayProcess, case: str) -> str:
    key = dev_key(gateway)
    if case == "expired":
        return jwt.encode({"alg": "ES256", "kid": key.kid}, claims(gateway, exp=int(time.time()) - 120), key)
    if case == "wrong-audience":
        return jwt.encode({"alg": "ES256", "kid": key.kid}, claims(gateway, aud="http://other/mcp"), key)
    if case == "wrong-issuer":
        return jwt.encode({"alg": "ES256", "kid": key.kid}, claims(gateway, iss="https://evil"), key)
    if case == "alg-none":
        return f"{b64(json.dumps({'alg': 'none'}).encode())}.{b64(json.dumps(claims(gateway)).encode())}."
    if case == "hs256-with-public-key":
        public = json.dumps(key.as_dict(private=False)).encode()
        head = {"alg": "HS256", "kid": key.kid}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims(gateway)).encode())}"
        return f"{signing_input}.{b64(hmac.new(public, signing_input.encode(), hashlib.sha256).digest())}"
    if case == "bad-signature":
        other = ECKey.generate_key("P-256", parameters={"kid": key.kid})
        return jwt.encode({"alg": "ES256", "kid": key.kid}, claims(gateway), other)
    if case == "unknown-kid":
        other = ECKey.generate_key("P-256", parameters={"kid": "not-ours"})
        return jwt.encode({"alg": "ES256", "kid": "not-ours"}, claims(gateway), other)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "token has expired"),
        ("wrong-audience", "token audience is not this gateway"),
        ("wrong-issuer", "token issuer 'https://evil' is not trusted"),
        ("alg-none", "token algorithm 'none' is not allowed"),
        ("hs256-with-public-key", "token algorithm 'HS256' is not allowed"),
        ("bad-signature", "token signature is invalid"),
        ("unknown-kid", "token key id 'not-ours' is unknown"),
    ],
)
async def test_a_bad_token_is_401_with_the_reason(gateway: GatewayProcess, case: str, message: str) -> None:
    status, headers, body = await post(gateway, token=forged(gateway, case))
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert message in headers["WWW-Authenticate"]
    assert message in json.loads(body)["error"]["message"]


async def test_a_non_bearer_scheme_is_401(gateway: GatewayProcess) -> None:
    status, headers, _ = await post(gateway, authorization="Basic dXNlcjpwYXNz")
    assert status == 401
    assert 'error="invalid_request"' in headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"jsonrpc": "2.0", "method": 5, "id": 1}', b"[]", b'"just a string"'],
    ids=["not-json", "bad-method", "empty-batch", "scalar"],
)
async def test_malformed_json_rpc_is_a_4xx_with_a_json_rpc_error(gateway: GatewayProcess, body: bytes) -> None:
    status, _, text = await post(gateway, body, token=gateway.token("edge-bot", ["analysts"]))
    assert 400 <= status < 500
    error = json.loads(text)["error"]
    assert error["code"] in (-32700, -32600, -32602)
    assert "Traceback" not in text


async def test_an_oversized_body_is_413(gateway: GatewayProcess) -> None:
    big = {**INIT, "params": {**INIT["params"], "padding": "x" * 2_000_000}}  # type: ignore[dict-item]
    status, _, text = await post(gateway, big, token=gateway.token("edge-bot", ["analysts"]))
    assert status == 413
    assert "too large" in text


async def test_a_foreign_origin_is_403_before_authentication(gateway: GatewayProcess) -> None:
    status, _, text = await post(gateway, origin="https://evil.example")
    assert status == 403
    assert "Origin 'https://evil.example' is not allowed" in text


async def test_a_foreign_host_is_421(gateway: GatewayProcess) -> None:
    status, _, text = await post(gateway, host="attacker.example")
    assert status == 421
    assert "Host 'attacker.example' is not allowed" in text


async def test_a_loopback_origin_is_accepted(gateway: GatewayProcess) -> None:
    status, _, _ = await post(gateway, token=gateway.token("edge-bot"), origin=f"http://localhost:{gateway.port}")
    assert status == 200


async def test_operational_endpoints(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.base_url}/healthz") as resp:
            assert (await resp.json())["status"] == "ok"
        async with s.get(f"{gateway.base_url}/readyz") as resp:
            ready = await resp.json()
        async with s.get(f"{gateway.base_url}/metrics") as resp:
            metrics = await resp.text()
    assert ready["status"] == "ready"
    assert ready["checks"] == {
        "policy": "ok", "grants": "ok", "metering": "ok", "audit": "ok", "disk": "ok", "approvals": "ok"
    }  # fmt: skip
    assert "castellan_auth_failures_total" in metrics
    assert "castellan_stage_seconds_bucket" in metrics


async def test_a_token_for_another_gateway_names_the_audience_it_carries_and_how_to_mint_one(
    gateway: GatewayProcess,
) -> None:
    status, _, body = await post(gateway, token=forged(gateway, "wrong-audience"))
    assert status == 401
    message = json.loads(body)["error"]["message"]
    assert "it is for 'http://other/mcp'" in message
    assert f"--url {gateway.mcp_url}" in message
