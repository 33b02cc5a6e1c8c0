"""The token-exchange service (RFC 8693) issues only what it should: to its registered clients, for a
subject token of the trusted issuer and audience, for a listed audience, within the scopes the
subject's groups are granted there; everything else is refused with the RFC's error codes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx2
import pytest

from server.auth.keys import StaticKeys
from server.credentials.sts import TOKEN_EXCHANGE, StsSettings, build_sts_app
from tests.unit.server.auth.test_verifier import AUDIENCE, ISSUER, PUBLIC, claims, sign

pytestmark = pytest.mark.anyio

UPSTREAM = "https://inventory.example/mcp"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@pytest.fixture
def sts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> httpx2.AsyncClient:
    monkeypatch.setenv("STS_SECRET", "s3cret-s3cret-s3cret")
    settings = StsSettings.model_validate(
        {
            "issuer": "https://sts.example",
            "key_file": str(tmp_path / "key.json"),
            "subject": {"issuer": ISSUER, "jwks_url": "unused", "audience": AUDIENCE, "algorithms": ["ES256"]},
            "clients": {"gateway": {"secret": {"env": "STS_SECRET"}, "audiences": [UPSTREAM]}},
            "audiences": {
                UPSTREAM: {
                    "scopes": ["read", "write"],
                    "groups": {"analysts": ["read"], "admins": ["read", "write"]},
                }
            },
        }
    )
    app = build_sts_app(settings, subject_keys=StaticKeys(PUBLIC))
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="https://sts.example")


def _form(subject: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS,
        "audience": UPSTREAM,
        **extra,
    }


async def _exchange(sts: httpx2.AsyncClient, form: Any, secret: str = "s3cret-s3cret-s3cret") -> httpx2.Response:
    body = urlencode(list(form.items()) if isinstance(form, dict) else form)
    headers = {"content-type": "application/x-www-form-urlencoded"}
    async with sts:
        return await sts.post("/token", content=body, headers=headers, auth=("gateway", secret))


def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


async def test_a_subject_gets_a_token_for_the_audience_with_its_groups_scopes_and_the_gateway_as_actor(
    sts: httpx2.AsyncClient,
) -> None:
    subject_exp = int(time.time()) + 120
    response = await _exchange(sts, _form(sign(claims(groups=["analysts"], exp=subject_exp))))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ACCESS
    assert body["scope"] == "read"
    issued = _payload(body["access_token"])
    assert issued["sub"] == "alice"
    assert issued["aud"] == UPSTREAM
    assert issued["act"] == {"sub": "gateway"}
    assert issued["client_id"] == "bot-1"
    assert issued["exp"] <= subject_exp  # never outlives the token it was exchanged for


async def test_requested_scopes_are_narrowed_to_the_subjects_grant(sts: httpx2.AsyncClient) -> None:
    response = await _exchange(sts, _form(sign(claims(groups=["analysts"])), scope="read write"))
    assert response.json()["scope"] == "read"


@pytest.mark.parametrize(
    ("make_form", "error"),
    [
        (lambda: _form(sign(claims(groups=["marketing"]))), "invalid_scope"),
        (lambda: _form(sign(claims(groups=["admins"])), audience="https://other.example/mcp"), "invalid_target"),
        (lambda: _form(sign(claims(groups=["admins"], aud="https://elsewhere.example"))), "invalid_request"),
        (lambda: _form(sign(claims(groups=["admins"], iss="https://evil.example"))), "invalid_request"),
        (lambda: _form(sign(claims(groups=["admins"])), actor_token="x", actor_token_type=ACCESS), "invalid_request"),
        (
            lambda: _form(
                sign(claims(groups=["admins"])), requested_token_type="urn:ietf:params:oauth:token-type:id_token"
            ),
            "invalid_request",
        ),
        (lambda: _form("not-a-token"), "invalid_request"),
    ],
    ids=["no-grant", "unlisted-audience", "foreign-audience", "foreign-issuer", "actor", "id-token", "garbage"],
)
async def test_what_the_service_will_not_exchange_is_refused_with_rfc_errors(
    sts: httpx2.AsyncClient, make_form: Callable[[], dict[str, str]], error: str
) -> None:
    # tokens signed when the test runs, not when it is collected (they live 300 s; a full suite is longer)
    response = await _exchange(sts, make_form())
    assert response.status_code == 400
    assert response.json()["error"] == error
    assert "access_token" not in response.json()


async def test_a_client_with_the_wrong_secret_gets_nothing(sts: httpx2.AsyncClient) -> None:
    response = await _exchange(sts, _form(sign(claims(groups=["admins"]))), secret="guess")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


async def test_two_audiences_at_once_are_refused(sts: httpx2.AsyncClient) -> None:
    form = [*_form(sign(claims(groups=["admins"]))).items(), ("audience", "https://other.example/mcp")]
    response = await _exchange(sts, form)
    assert response.json()["error"] == "invalid_target"
