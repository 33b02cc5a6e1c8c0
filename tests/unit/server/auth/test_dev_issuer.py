"""The dev issuer refuses what OAuth 2.1 refuses: no PKCE, plain PKCE, another resource, a replayed code,
an unregistered redirect, a cross-site sign-in post; and grants operator scopes to admins only."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from server.auth.issuer.routes import issuer_routes
from server.auth.issuer.server import DevIssuer

BASE = "http://127.0.0.1:8750"
REDIRECT = "http://127.0.0.1:33418/callback"
VERIFIER = "v" * 64
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).rstrip(b"=").decode()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[TestClient]:
    issuer = DevIssuer(
        issuer=BASE, resource_url=f"{BASE}/mcp", audience=f"{BASE}/mcp", data_dir=tmp_path, scopes=["demo:clock"]
    )
    with TestClient(Starlette(routes=issuer_routes(issuer)), base_url=BASE) as client:
        yield client
    issuer.close()


def _register(web: TestClient, **extra: Any) -> str:
    body = {"client_name": "Unit", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", **extra}
    resp = web.post("/oauth2/register", json=body)
    assert resp.status_code == 201, resp.text
    assert "client_secret" not in resp.json()  # a public client gets no secret
    return str(resp.json()["client_id"])


def _authorize(web: TestClient, client_id: str, **params: str) -> dict[str, str]:
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "st",
             "code_challenge": CHALLENGE, "code_challenge_method": "S256", **params}  # fmt: skip
    return {k: v for k, v in query.items() if v != ""}


def _sign_in(web: TestClient, query: dict[str, str], identity: str = "alice", **headers: str) -> Any:
    form = {**query, "identity": identity, "decision": "allow", "grant_scope": query.get("scope", "").split()}
    return web.post("/oauth2/authorize", data=form, headers=headers, follow_redirects=False)


def _code(resp: Any) -> str:
    assert resp.status_code == 302, resp.text
    return parse_qs(urlsplit(resp.headers["location"]).query)["code"][0]


def _token(web: TestClient, client_id: str, code: str, **extra: str) -> Any:
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": client_id,
            "code_verifier": VERIFIER, **extra}  # fmt: skip
    return web.post("/oauth2/token", data=form)


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def test_metadata_names_the_endpoints_and_s256_only(web: TestClient) -> None:
    meta = web.get("/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == BASE
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["client_id_metadata_document_supported"] is True
    assert web.get("/oauth2/jwks.json").json()["keys"][0]["kty"] == "EC"


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"code_challenge": "", "code_challenge_method": ""}, "code_challenge is required"),
        ({"code_challenge_method": "plain"}, "code_challenge_method must be S256"),
        ({"resource": "https://other.example/mcp"}, "invalid_target"),
    ],
)
def test_an_authorization_request_without_s256_pkce_or_for_another_resource_is_refused(
    web: TestClient, params: dict[str, str], reason: str
) -> None:
    client_id = _register(web)
    resp = web.get("/oauth2/authorize", params=_authorize(web, client_id, **params), follow_redirects=False)
    assert resp.status_code == 302
    assert reason in resp.headers["location"].replace("+", " ")
    assert "code=" not in resp.headers["location"]


def test_an_unregistered_redirect_uri_gets_an_error_page_not_a_redirect(web: TestClient) -> None:
    client_id = _register(web)
    query = _authorize(web, client_id, redirect_uri="https://attacker.example/cb")
    resp = web.get(f"/oauth2/authorize?{urlencode(query)}", follow_redirects=False)
    assert resp.status_code == 400
    assert "attacker.example" not in resp.headers.get("location", "")


def test_a_code_works_once_and_only_with_its_verifier(web: TestClient) -> None:
    client_id = _register(web)
    code = _code(_sign_in(web, _authorize(web, client_id)))
    assert _token(web, client_id, code, code_verifier="w" * 64).json()["error"] == "invalid_grant"
    code = _code(_sign_in(web, _authorize(web, client_id)))
    first = _token(web, client_id, code)
    assert first.status_code == 200, first.text
    assert _token(web, client_id, code).json()["error"] == "invalid_grant"


def _refresh(web: TestClient, client_id: str, refresh_token: str) -> Any:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    return web.post("/oauth2/token", data=form)


def test_reusing_a_rotated_refresh_token_revokes_its_whole_family(web: TestClient) -> None:
    client_id = _register(web, grant_types=["authorization_code", "refresh_token"], scope="demo:clock")

    def sign_in() -> str:
        resp = _token(web, client_id, _code(_sign_in(web, _authorize(web, client_id, scope="demo:clock"))))
        return str(resp.json()["refresh_token"])

    first = sign_in()
    second = _refresh(web, client_id, first)
    assert second.status_code == 200, second.text
    successor = second.json()["refresh_token"]
    other = sign_in()

    assert _refresh(web, client_id, first).json()["error"] == "invalid_grant"  # the leaked, rotated token
    assert _refresh(web, client_id, successor).json()["error"] == "invalid_grant"  # its family went with it
    assert _refresh(web, client_id, other).status_code == 200  # another sign-in's family is untouched


def test_a_sign_in_posted_from_another_site_is_refused(web: TestClient) -> None:
    client_id = _register(web)
    resp = _sign_in(web, _authorize(web, client_id), origin="https://evil.example")
    assert resp.status_code == 403


def test_denying_redirects_with_access_denied_and_the_issuer(web: TestClient) -> None:
    client_id = _register(web)
    form = {**_authorize(web, client_id), "identity": "alice", "decision": "deny"}
    resp = web.post("/oauth2/authorize", data=form, follow_redirects=False)
    query = parse_qs(urlsplit(resp.headers["location"]).query)
    assert query["error"] == ["access_denied"]
    assert query["iss"] == [BASE]


@pytest.mark.parametrize(("identity", "operator"), [("alice", False), ("olivia", True)])
def test_only_administrators_are_granted_the_gateways_operator_scopes(
    web: TestClient, identity: str, operator: bool
) -> None:
    client_id = _register(web)
    query = _authorize(web, client_id, scope="demo:clock castellan:admin castellan:audit")
    token = _token(web, client_id, _code(_sign_in(web, query, identity))).json()
    scopes = _claims(token["access_token"])["scope"].split()
    assert "demo:clock" in scopes
    assert ("castellan:admin" in scopes) is operator
    assert token["scope"] == " ".join(scopes)


def test_a_document_client_id_that_is_not_https_is_not_fetched(web: TestClient) -> None:
    resp = web.get("/oauth2/authorize", params=_authorize(web, "http://127.0.0.1:9/client.json"))
    assert resp.status_code == 400
    assert "does not exist" in resp.text
