"""Sign-in with the authorization server (code + PKCE): the state is checked, the verifier is sent, the
token is verified like a pasted one, and the session cookie is set only after that. The authorization
server is a fake (`FakeAuthorizationServer`) that answers as the dev issuer does."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from starlette.testclient import TestClient

from server.app import create_app
from server.auth.devkeys import mint_dev_token
from server.console.context import Console
from server.console.oauth import CALLBACK_PATH, SCOPES, ConsoleOAuth
from server.console.session import COOKIE, FLOW_COOKIE
from server.settings import Settings
from tests.unit.server.console.conftest import BASE


@dataclass
class FakeAuthorizationServer:
    """Metadata, registration and a token endpoint; the token it answers holds `granted`."""

    settings: Settings
    granted: tuple[str, ...] = ("castellan:audit", "castellan:admin")
    issuer: str = ""
    registration: bool = True
    names_issuer: bool = False
    token_status: int = 200
    asked: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def get_json(self, url: str) -> tuple[int, Any]:
        self.asked.append(("GET " + url, {}))
        issuer = self.issuer or self.settings.issuer
        if url != f"{self.settings.base_url}/.well-known/oauth-authorization-server":
            return 404, None
        metadata = {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/oauth2/authorize",
            "token_endpoint": f"{issuer}/oauth2/token",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
        }
        if self.names_issuer:
            metadata["authorization_response_iss_parameter_supported"] = True
        if self.registration:
            metadata["registration_endpoint"] = f"{issuer}/oauth2/register"
        return 200, metadata

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> tuple[int, Any]:
        self.asked.append(("POST " + url, {"form": dict(form or {}), "json": dict(json or {}), "auth": auth}))
        if url.endswith("/oauth2/register"):
            return 201, {"client_id": "castellan-console-1234", **dict(json or {})}
        if self.token_status == 401:
            return 401, {"error": "invalid_client", "error_description": "unknown client"}
        if self.token_status != 200:
            return self.token_status, {"error": "invalid_grant", "error_description": "the code was already used"}
        token = mint_dev_token(
            self.settings.data_dir, agent="castellan-console-1234", subject="olivia", issuer=self.settings.issuer,
            audience=self.settings.resource_url, scopes=self.granted, groups=("admins",),
        )  # fmt: skip
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600, "scope": " ".join(self.granted)}

    def token_requests(self) -> list[dict[str, Any]]:
        return [body for what, body in self.asked if what.endswith("/oauth2/token")]


@dataclass
class OAuthRig:
    client: TestClient
    settings: Settings
    server: FakeAuthorizationServer

    @property
    def console(self) -> Console:
        console = self.client.app.state.console  # type: ignore[attr-defined]
        assert isinstance(console, Console)
        return console

    def start(self) -> dict[str, str]:
        """Follow "Sign in with": the authorization request's parameters."""
        response = self.client.get("/console/oauth/start", follow_redirects=False)
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        assert location.startswith(f"{self.settings.issuer}/oauth2/authorize?")
        return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

    def callback(self, **params: str) -> Any:
        return self.client.get(CALLBACK_PATH, params=params, follow_redirects=False)


def _rig(tmp_path: Path, server_options: dict[str, Any], console: dict[str, Any] | None = None) -> Iterator[OAuthRig]:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False},
        policy={"engine": "embedded", "reload": False, "decision_log": False},
        console=console or {},
    )
    server = FakeAuthorizationServer(settings, **server_options)
    with TestClient(create_app(settings), base_url=BASE) as client:
        oauth = client.app.state.console.oauth  # type: ignore[attr-defined]
        assert isinstance(oauth, ConsoleOAuth)
        oauth.http = server
        yield OAuthRig(client, settings, server)


@pytest.fixture
def oauth_options() -> dict[str, Any]:
    return {}


@pytest.fixture
def rig(tmp_path: Path, oauth_options: dict[str, Any]) -> Iterator[OAuthRig]:
    yield from _rig(tmp_path, oauth_options)


def test_the_sign_in_page_offers_the_gateways_issuer_beside_the_token_form(rig: OAuthRig) -> None:
    page = rig.client.get("/console/sign-in").text
    assert 'href="/console/oauth/start"' in page
    assert "Sign in with this gateway&#39;s dev issuer" in page or "Sign in with this gateway's dev issuer" in page
    assert "Bearer token" in page


def test_the_authorization_request_asks_for_the_console_scopes_for_this_gateway_with_pkce(rig: OAuthRig) -> None:
    params = rig.start()
    assert params["response_type"] == "code"
    assert params["client_id"] == "castellan-console-1234"  # registered dynamically, once
    assert params["redirect_uri"] == f"{rig.settings.base_url}{CALLBACK_PATH}"
    assert params["resource"] == rig.settings.resource_url
    assert params["scope"].split() == list(SCOPES)
    assert params["code_challenge_method"] == "S256"
    assert len(params["state"]) >= 32
    [registration] = [body for what, body in rig.server.asked if what.endswith("/oauth2/register")]
    assert registration["json"]["redirect_uris"] == [params["redirect_uri"]]
    assert registration["json"]["token_endpoint_auth_method"] == "none"
    rig.start()
    assert len([w for w, _ in rig.server.asked if w.endswith("/oauth2/register")]) == 1


def test_the_registered_client_is_kept_across_a_restart_and_forgotten_once_the_server_refuses_it(
    tmp_path: Path,
) -> None:
    for rig in _rig(tmp_path, {}):
        first = rig.start()["client_id"]
    for rig in _rig(tmp_path, {"token_status": 401}):
        params = rig.start()
        assert params["client_id"] == first
        assert not [w for w, _ in rig.server.asked if w.endswith("/oauth2/register")]
        rig.callback(code="the-code", state=params["state"])  # answered invalid_client
        rig.start()
        assert len([w for w, _ in rig.server.asked if w.endswith("/oauth2/register")]) == 1


def test_the_flow_cookie_is_sealed_http_only_and_scoped_to_the_callback(rig: OAuthRig) -> None:
    response = rig.client.get("/console/oauth/start", follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert f"{FLOW_COOKIE}=" in cookie
    for attribute in ("httponly", "samesite=lax", "path=/console/oauth"):
        assert attribute in cookie
    state = parse_qs(urlsplit(response.headers["location"]).query)["state"][0]
    assert state not in response.headers["set-cookie"]  # sealed, not readable


def test_the_code_is_exchanged_with_the_pkce_verifier_and_only_then_the_session_is_set(rig: OAuthRig) -> None:
    params = rig.start()
    assert COOKIE not in rig.client.cookies
    response = rig.callback(code="the-code", state=params["state"], iss=rig.settings.issuer)
    assert response.status_code == 200, response.text
    assert 'url=/console/audit"' in response.text
    [request] = rig.server.token_requests()
    form = request["form"]
    assert form["grant_type"] == "authorization_code"
    assert form["code"] == "the-code"
    assert create_s256_code_challenge(form["code_verifier"]) == params["code_challenge"]
    assert form["redirect_uri"] == params["redirect_uri"]
    assert form["resource"] == rig.settings.resource_url
    assert form["client_id"] == "castellan-console-1234"
    assert f"{COOKIE}=" in response.headers["set-cookie"]
    page = rig.client.get("/console/audit")
    assert page.status_code == 200
    assert "olivia" in page.text


def test_a_callback_whose_state_is_not_the_browsers_is_refused_and_no_code_is_exchanged(rig: OAuthRig) -> None:
    rig.start()
    response = rig.callback(code="the-attackers-code", state="a-state-from-another-browser")
    assert response.status_code == 400
    assert "state does not match" in response.text
    assert rig.server.token_requests() == []
    assert COOKIE not in response.cookies
    assert rig.client.get("/console/audit", follow_redirects=False).status_code == 303


def test_a_callback_without_a_flow_in_this_browser_is_refused(rig: OAuthRig) -> None:
    params = rig.start()
    rig.client.cookies.delete(FLOW_COOKIE, path="/console/oauth")
    response = rig.callback(code="the-code", state=params["state"])
    assert response.status_code == 400
    assert "not started in this browser" in response.text
    assert rig.server.token_requests() == []


@pytest.mark.parametrize("oauth_options", [{"granted": ("castellan:approve",)}])
def test_a_token_without_castellan_audit_keeps_the_user_at_the_sign_in_page(rig: OAuthRig) -> None:
    params = rig.start()
    response = rig.callback(code="the-code", state=params["state"])
    assert response.status_code == 403
    assert "castellan:audit" in response.text
    assert 'href="/console/oauth/start"' in response.text  # the sign-in page again
    assert COOKIE not in response.cookies
    assert rig.client.get("/console/audit", follow_redirects=False).headers["location"] == "/console/sign-in"


@pytest.mark.parametrize("oauth_options", [{"token_status": 400}])
def test_a_refused_code_exchange_signs_nobody_in(rig: OAuthRig) -> None:
    params = rig.start()
    response = rig.callback(code="the-code", state=params["state"])
    assert response.status_code == 400
    assert "the code was already used" in response.text
    assert COOKIE not in response.cookies


def test_a_denied_authorization_and_an_answer_from_another_issuer_are_refused(rig: OAuthRig) -> None:
    params = rig.start()
    denied = rig.callback(error="access_denied", state=params["state"])
    assert denied.status_code == 400
    assert "access_denied" in denied.text
    params = rig.start()
    mixed_up = rig.callback(code="the-code", state=params["state"], iss="https://evil.example")
    assert "iss mismatch" in mixed_up.text
    rig.server.names_issuer = True
    rig.console.oauth._metadata = None  # type: ignore[union-attr]
    params = rig.start()
    unnamed = rig.callback(code="the-code", state=params["state"])
    assert "does not name its issuer" in unnamed.text
    assert rig.server.token_requests() == []


def test_a_token_the_gateway_does_not_trust_is_refused_after_the_exchange(rig: OAuthRig) -> None:
    async def foreign(url: str, **kwargs: Any) -> tuple[int, Any]:
        other = mint_dev_token(
            rig.settings.data_dir, agent="x", issuer="https://other.example", audience=rig.settings.resource_url,
            scopes=("castellan:admin",),
        )  # fmt: skip
        return 200, {"access_token": other, "token_type": "Bearer"}

    params = rig.start()
    rig.server.post = foreign  # type: ignore[method-assign]
    response = rig.callback(code="the-code", state=params["state"])
    assert response.status_code == 401
    assert "The token was refused" in response.text
    assert COOKIE not in response.cookies


def test_a_configured_confidential_client_is_used_without_registering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSOLE_TEST_SECRET", "s3cret")
    console = {"oauth_client_id": "castellan-console", "oauth_client_secret": {"env": "CONSOLE_TEST_SECRET"}}
    for rig in _rig(tmp_path, {"registration": False}, console):
        params = rig.start()
        assert params["client_id"] == "castellan-console"
        rig.callback(code="the-code", state=params["state"])
        [request] = rig.server.token_requests()
        assert request["auth"] == ("castellan-console", "s3cret")  # client_secret_basic
        assert "client_id" not in request["form"]
        assert not [w for w, _ in rig.server.asked if w.endswith("/register")]


def test_without_an_authorization_server_only_the_token_form_is_offered(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False},
        policy={"engine": "embedded", "reload": False, "decision_log": False},
        auth={"dev_issuer": False},
    )
    with TestClient(create_app(settings), base_url=BASE) as client:
        assert client.app.state.console.oauth is None  # type: ignore[attr-defined]
        page = client.get("/console/sign-in").text
        assert "/console/oauth/start" not in page
        assert "Bearer token" in page
        assert client.get("/console/oauth/start", follow_redirects=False).status_code == 404
