"""Sign-in with the gateway's authorization server: the console as an OAuth 2.1 client (authorization
code + PKCE S256), on authlib's client pieces.

The authorization server is the one the gateway trusts (`auth.authorization_servers`, else the issuer:
in dev mode the gateway's own dev issuer), found from its RFC 8414 metadata (OpenID discovery as a
fallback, which Hydra serves). The client is `console.oauth_client_id` (and its secret, from env or a
file), or, when none is configured, one registered dynamically (RFC 7591, a public client) at the first
sign-in and kept in `<data_dir>/console-oauth-client.json` (so a restart neither registers again nor
strands a sign-in in flight). The code is exchanged here, server-side; the access token it yields is then treated
exactly as a pasted bearer token (the routes verify it with the gateway's verifier).

A sign-in in flight is a `Flow` (state, PKCE verifier), kept sealed in a short-lived cookie of its own;
the callback's `state` must be the flow's. Every failure is a `SignInFailed` with a reason a person can
read; nothing here sets a session.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import structlog
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata, get_well_known_url

from server.auth.metadata import authorization_servers
from server.credentials.secrets import read_secret
from server.settings import Settings

log = structlog.get_logger("castellan.console")

CALLBACK_PATH = "/console/oauth/callback"
SCOPES = ("castellan:audit", "castellan:approve", "castellan:admin")
"""Asked for at every sign-in; whatever the server grants decides the roles."""
FLOW_TTL_SECONDS = 600.0
CLIENT_FILE = "console-oauth-client.json"
_TIMEOUT_SECONDS = 10.0


class SignInFailed(Exception):
    """The OAuth sign-in did not yield a token (the message says why, for the sign-in page)."""


@dataclass(frozen=True, slots=True)
class Flow:
    """One sign-in in flight: what the callback must see again (`state`) and prove (`verifier`)."""

    state: str
    verifier: str
    started_at: float


class OAuthHttp(Protocol):
    """The HTTP the client needs: a JSON GET, and a POST of a form or JSON; each answers (status, JSON
    body or None). Raises `SignInFailed` when the server cannot be reached."""

    async def get_json(self, url: str) -> tuple[int, Any]: ...

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> tuple[int, Any]: ...


class AiohttpOAuthHttp:
    """`OAuthHttp` over aiohttp, one session per request (a sign-in is not a hot path)."""

    async def get_json(self, url: str) -> tuple[int, Any]:
        return await self._request("GET", url)

    async def post(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> tuple[int, Any]:
        return await self._request("POST", url, data=dict(form) if form is not None else None, json=json, auth=auth)

    async def _request(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        auth = kwargs.pop("auth", None)
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT_SECONDS)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                basic = aiohttp.BasicAuth(*auth) if auth else None
                async with session.request(method, url, auth=basic, allow_redirects=False, **kwargs) as resp:
                    try:
                        body = await resp.json(content_type=None)
                    except ValueError:
                        body = None
                    return resp.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SignInFailed(f"the authorization server did not answer ({type(exc).__name__})") from None


@dataclass(frozen=True, slots=True)
class _Client:
    client_id: str
    secret: str | None


class ConsoleOAuth:
    """The console's OAuth client of one authorization server (`issuer`)."""

    def __init__(
        self,
        *,
        issuer: str,
        resource: str,
        redirect_uri: str,
        client_id: str = "",
        client_secret: str | None = None,
        http: OAuthHttp | None = None,
        label: str = "",
        client_file: Path | None = None,
    ) -> None:
        """`client_file`: where a dynamically registered client is kept (None: for this process only)."""
        self.issuer = issuer.rstrip("/")
        self.resource = resource
        self.redirect_uri = redirect_uri
        self.label = label or (urlsplit(issuer).netloc or issuer)
        self.http: OAuthHttp = http or AiohttpOAuthHttp()
        self._client = _Client(client_id, client_secret) if client_id else None
        self._client_file = client_file
        self._configured = bool(client_id)
        self._metadata: AuthorizationServerMetadata | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsoleOAuth | None:
        """The client for these settings, or None when the gateway knows no authorization server (then the
        console offers only the bearer-token form)."""
        servers = authorization_servers(settings)
        if not servers:
            return None
        console = settings.console
        source = console.oauth_client_secret
        secret = read_secret(source, "console.oauth_client_secret") if source.env or source.file else None
        issuer = servers[0].rstrip("/")
        own = settings.auth.mode == "dev" and settings.auth.dev_issuer and issuer == settings.issuer.rstrip("/")
        return cls(
            issuer=issuer,
            resource=settings.resource_url,
            redirect_uri=f"{settings.base_url}{CALLBACK_PATH}",
            client_id=console.oauth_client_id,
            client_secret=secret,
            label="this gateway's dev issuer" if own else "",
            client_file=settings.data_dir / CLIENT_FILE,
        )

    async def start(self) -> tuple[str, Flow]:
        """The authorization URL to send the browser to, and the flow the callback must match."""
        metadata = await self.metadata()
        client = await self.client(metadata)
        flow = Flow(state=generate_token(32), verifier=generate_token(64), started_at=time.time())
        url = prepare_grant_uri(
            metadata["authorization_endpoint"],
            client.client_id,
            "code",
            redirect_uri=self.redirect_uri,
            scope=" ".join(SCOPES),
            state=flow.state,
            code_challenge=create_s256_code_challenge(flow.verifier),
            code_challenge_method="S256",
            resource=self.resource,
        )
        return str(url), flow

    async def finish(self, flow: Flow | None, params: Mapping[str, str], now: float | None = None) -> str:
        """The access token for the callback's `params` (code, state, iss). Raises `SignInFailed`: no flow
        in this browser, a state that is not the flow's, an error from the server, or a refused exchange."""
        state = params.get("state", "")
        if flow is None:
            raise SignInFailed("this sign-in was not started in this browser, or took too long: start again")
        if not hmac.compare_digest(flow.state.encode(), state.encode()):
            raise SignInFailed("the sign-in's state does not match the one this browser started (refused)")
        if (now or time.time()) - flow.started_at > FLOW_TTL_SECONDS:
            raise SignInFailed("this sign-in took too long: start again")
        metadata = await self.metadata()
        if "iss" in params and params["iss"].rstrip("/") != str(metadata["issuer"]).rstrip("/"):  # RFC 9207
            raise SignInFailed("the answer came from another authorization server (iss mismatch)")
        if "iss" not in params and metadata.get("authorization_response_iss_parameter_supported"):
            raise SignInFailed("the answer does not name its issuer, which this authorization server always does")
        if "error" in params:
            described = params.get("error_description") or params["error"]
            raise SignInFailed(f"the authorization server said: {described}")
        code = params.get("code")
        if not code:
            raise SignInFailed("the authorization server sent no code")
        client = await self.client(metadata)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": flow.verifier,
            "resource": self.resource,
        }
        auth = (client.client_id, client.secret) if client.secret else None
        if auth is None:
            form["client_id"] = client.client_id
        status, body = await self.http.post(metadata["token_endpoint"], form=form, auth=auth)
        if status != 200 and isinstance(body, dict) and body.get("error") == "invalid_client" and not self._configured:
            self._forget(client)  # the server no longer knows the client it registered: register at the next start
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise SignInFailed(f"the token endpoint refused the code: {_described(body, status)}")
        if str(body.get("token_type", "bearer")).lower() != "bearer":
            raise SignInFailed(f"the token endpoint answered a {body.get('token_type')} token, not a bearer token")
        return str(body["access_token"])

    async def metadata(self) -> AuthorizationServerMetadata:
        """RFC 8414 metadata of `issuer` (OpenID discovery when that is all it serves), validated once."""
        if self._metadata is not None:
            return self._metadata
        async with self._lock:
            if self._metadata is None:
                self._metadata = await self._discover()
        return self._metadata

    async def _discover(self) -> AuthorizationServerMetadata:
        for suffix in ("oauth-authorization-server", "openid-configuration"):
            url = get_well_known_url(self.issuer, external=True, suffix=suffix)
            status, body = await self.http.get_json(url)
            if status == 200 and isinstance(body, dict):
                break
        else:
            raise SignInFailed(f"{self.issuer} publishes no authorization server metadata")
        metadata = AuthorizationServerMetadata(body)
        try:
            metadata.validate_issuer()
            metadata.validate_authorization_endpoint()
            metadata.validate_token_endpoint()
            metadata.validate_code_challenge_methods_supported()
        except ValueError as exc:
            raise SignInFailed(f"the authorization server's metadata is unusable: {exc}") from None
        if str(metadata["issuer"]).rstrip("/") != self.issuer:  # RFC 8414 §3.3
            raise SignInFailed(f"the metadata at {url} names another issuer ({metadata['issuer']})")
        methods = metadata.get("code_challenge_methods_supported")
        if methods is not None and "S256" not in methods:
            raise SignInFailed("the authorization server does not support PKCE with S256")
        return metadata

    async def client(self, metadata: AuthorizationServerMetadata) -> _Client:
        """The configured client, else one registered once (RFC 7591) for this process."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = self._registered() or await self._register(metadata)
        return self._client

    def _registered(self) -> _Client | None:
        """The client registered earlier for this issuer and redirect URI, if kept."""
        if self._client_file is None:
            return None
        try:
            kept = json.loads(self._client_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(kept, dict) or not kept.get("client_id"):
            return None
        if kept.get("issuer") != self.issuer or kept.get("redirect_uri") != self.redirect_uri:
            return None  # registered for another issuer or address: register again
        return _Client(str(kept["client_id"]), kept.get("client_secret") or None)

    def _forget(self, client: _Client) -> None:
        log.info("console_oauth_client_forgotten", issuer=self.issuer, client_id=client.client_id)
        self._client = None
        if self._client_file is not None:
            self._client_file.unlink(missing_ok=True)

    def _keep(self, client: _Client) -> None:
        if self._client_file is None:
            return
        document = {"issuer": self.issuer, "redirect_uri": self.redirect_uri, "client_id": client.client_id}
        if client.secret:
            document["client_secret"] = client.secret
        self._client_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._client_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(document, fh, indent=2)
        os.replace(tmp, self._client_file)

    async def _register(self, metadata: AuthorizationServerMetadata) -> _Client:
        endpoint = metadata.get("registration_endpoint")
        if not endpoint:
            raise SignInFailed(
                "no console.oauth_client_id is configured and the authorization server offers no registration"
            )
        document = {
            "client_name": "Castellan console",
            "redirect_uris": [self.redirect_uri],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
            "scope": " ".join(SCOPES),
        }
        status, body = await self.http.post(str(endpoint), json=document)
        if status not in (200, 201) or not isinstance(body, dict) or not body.get("client_id"):
            raise SignInFailed(f"the authorization server refused to register the console: {_described(body, status)}")
        log.info("console_oauth_client_registered", issuer=self.issuer, client_id=body["client_id"])
        secret = body.get("client_secret")
        client = _Client(str(body["client_id"]), str(secret) if secret else None)
        self._keep(client)
        return client


def _described(body: Any, status: int) -> str:
    if isinstance(body, dict) and body.get("error"):
        return str(body.get("error_description") or body["error"])
    return f"HTTP {status}"
