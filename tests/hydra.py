"""Ory Hydra v2.3.0, a real OAuth 2.1 / OpenID Connect authorization server, for the identity tests.

`scripts/install-test-deps` builds it (`.cache/bin/hydra`). `run_hydra()` starts `hydra serve all` on two
free loopback ports (public and admin) with an in-memory store and JWT access tokens, and stops it after.

Hydra delegates login and consent to an application of the operator's; `HydraLogin` is that application,
driven headlessly through Hydra's admin API: it follows the browser's redirects, accepts the login as a
named user and the consent with the scopes that user is allowed, and returns the client's callback URL.
Hydra does not read RFC 8707's `resource` parameter, so the consent grants the requested resource as the
access token's audience (`grant_access_token_audience`) and adds it to the client's allowed audiences
(Hydra checks a refresh against them), as a Hydra login/consent app does for MCP clients.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import pytest

from tests.gateway_process import free_port, stop

HYDRA = Path(__file__).resolve().parents[1] / ".cache" / "bin" / "hydra"
SCOPES = ("openid", "offline_access", "offline")


@dataclass
class User:
    """Who signs in at the login app, and what the consent grants them (the rest is refused)."""

    subject: str
    groups: tuple[str, ...] = ()
    allowed_scopes: set[str] = field(default_factory=set)


@dataclass
class Hydra:
    public_port: int
    admin_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/oauth2/token"

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.admin_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"hydra admin {method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from None
        return json.loads(raw) if raw else None

    def create_client(self, **metadata: Any) -> dict[str, Any]:
        """A client registered by the operator (admin API), e.g. a headless agent's client credentials."""
        return dict(self.admin("POST", "/admin/clients", metadata))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _config(public: int, admin: int, scopes: Sequence[str]) -> dict[str, Any]:
    login_app = f"http://127.0.0.1:{free_port()}"  # never fetched: HydraLogin intercepts its redirects
    return {
        "dsn": "memory",
        "log": {"level": "warn", "leak_sensitive_values": False},
        "serve": {
            "public": {"host": "127.0.0.1", "port": public},
            "admin": {"host": "127.0.0.1", "port": admin},
        },
        "urls": {
            "self": {"issuer": f"http://127.0.0.1:{public}"},
            "login": f"{login_app}/login",
            "consent": f"{login_app}/consent",
        },
        "secrets": {"system": ["castellan-tests-hydra-system-secret"]},
        "strategies": {"access_token": "jwt", "jwt": {"scope_claim": "both"}},
        "oauth2": {"allowed_top_level_claims": ["groups"], "pkce": {"enforced_for_public_clients": True}},
        "oidc": {"dynamic_client_registration": {"enabled": True, "default_scope": [*SCOPES, *scopes]}},
        "webfinger": {
            "oidc_discovery": {
                "supported_scope": list(scopes),
                "client_registration_url": f"http://127.0.0.1:{public}/oauth2/register",
            }
        },
        "ttl": {"access_token": "1h", "refresh_token": "720h"},
    }


def _wait(hydra: Hydra, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hydra.process.poll() is not None:
            raise RuntimeError(f"hydra exited with {hydra.process.returncode}:\n{hydra.log()}")
        try:
            with urllib.request.urlopen(f"{hydra.admin_url}/health/ready", timeout=1) as resp:
                if resp.status == 200:
                    with socket.create_connection(("127.0.0.1", hydra.public_port), timeout=1):
                        return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"hydra not ready after {timeout}s:\n{hydra.log()}")


@contextmanager
def run_hydra(tmp: Path, scopes: Sequence[str] = ()) -> Iterator[Hydra]:
    """Hydra on loopback, advertising `scopes` (beside openid/offline_access) in its discovery document."""
    if not HYDRA.exists():
        pytest.fail("Ory Hydra is not installed: run scripts/install-test-deps")
    public, admin = free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "hydra.json"  # Hydra reads JSON configuration files as well as YAML
    config.write_text(json.dumps(_config(public, admin, scopes)))
    log_path = tmp / "hydra.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(HYDRA), "serve", "all", "--dev", "--sqa-opt-out", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    hydra = Hydra(public, admin, process, log_path)
    try:
        _wait(hydra)
        yield hydra
    finally:
        stop(process)


class HydraLogin:
    """The login and consent app, headless: `authorize(url)` returns the client's redirect URL (with
    `code` and `state`) after signing `user` in and granting what `user.allowed_scopes` allows."""

    def __init__(self, hydra: Hydra, users: Mapping[str, User]) -> None:
        self.hydra = hydra
        self.users = users
        self.consents: list[dict[str, Any]] = []
        """Each consent request as Hydra showed it (requested scopes, audience): what the user was asked."""

    async def authorize(self, url: str, as_user: str) -> str:
        user = self.users[as_user]
        # A browser: cookies (Hydra's CSRF cookies are set on 127.0.0.1, so the jar must take IP hosts).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            for _ in range(10):
                async with browser.get(url, allow_redirects=False) as response:
                    if response.status not in (302, 303):
                        text = await response.text()
                        raise RuntimeError(f"authorization stopped at {url}: HTTP {response.status} {text[:300]}")
                    location = urljoin(url, response.headers["location"])
                query = parse_qs(urlsplit(location).query)
                if "login_challenge" in query:
                    url = self._accept_login(query["login_challenge"][0], user)
                elif "consent_challenge" in query:
                    url = self._accept_consent(query["consent_challenge"][0], user)
                elif urlsplit(location).netloc == urlsplit(self.hydra.issuer).netloc:
                    url = location
                else:
                    return location  # the client's redirect URI
        raise RuntimeError("too many redirects in the authorization flow")

    def _accept_login(self, challenge: str, user: User) -> str:
        accepted = self.hydra.admin(
            "PUT",
            f"/admin/oauth2/auth/requests/login/accept?login_challenge={challenge}",
            {"subject": user.subject, "remember": False},
        )
        return str(accepted["redirect_to"])

    def _accept_consent(self, challenge: str, user: User) -> str:
        request = self.hydra.admin("GET", f"/admin/oauth2/auth/requests/consent?consent_challenge={challenge}")
        self.consents.append(request)
        requested = list(request.get("requested_scope") or [])
        granted = [s for s in requested if s in SCOPES or s in user.allowed_scopes]
        original = parse_qs(urlsplit(request.get("request_url") or "").query)
        audience = list(request.get("requested_access_token_audience") or []) + original.get("resource", [])
        client = request.get("client") or {}
        if not set(audience) <= set(client.get("audience") or []):
            # Hydra checks a refresh's audience against the client's allow-list, which a dynamically
            # registered client has empty: the consent app allows the resource the user consented to.
            self.hydra.admin(
                "PATCH",
                f"/admin/clients/{client['client_id']}",
                [{"op": "add", "path": "/audience", "value": sorted({*(client.get("audience") or []), *audience})}],
            )
        accepted = self.hydra.admin(
            "PUT",
            f"/admin/oauth2/auth/requests/consent/accept?consent_challenge={challenge}",
            {
                "grant_scope": granted,
                "grant_access_token_audience": audience,
                "remember": False,
                "session": {"access_token": {"groups": list(user.groups)}},
            },
        )
        return str(accepted["redirect_to"])


async def user_token(hydra: Hydra, login: HydraLogin, user: str, audience: str, scope: str) -> str:
    """`user`'s access token for `audience`, by authorization code + PKCE through a client registered
    by the operator (as an agent's desktop client would get one)."""
    import secrets

    from authlib.integrations.requests_client import OAuth2Session

    redirect = "http://127.0.0.1:1/callback"
    client = hydra.create_client(
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        redirect_uris=[redirect],
        scope=f"{scope} offline_access",
        audience=[audience],
        token_endpoint_auth_method="none",
    )
    verifier = secrets.token_urlsafe(48)
    with OAuth2Session(
        client["client_id"], scope=scope, redirect_uri=redirect, code_challenge_method="S256"
    ) as session:
        url, _ = session.create_authorization_url(
            f"{hydra.issuer}/oauth2/auth", code_verifier=verifier, audience=audience
        )
        callback = await login.authorize(url, as_user=user)
        token = session.fetch_token(
            f"{hydra.issuer}/oauth2/token", authorization_response=callback, code_verifier=verifier
        )
    return str(token["access_token"])
