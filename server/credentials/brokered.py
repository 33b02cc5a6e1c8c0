"""Brokered per-user grants: each user authorizes an upstream once; the gateway holds and refreshes the grant.

The flow is OAuth 2.1 authorization code with PKCE, with the gateway as the client of the upstream's
authorization server. A call by a user who has not authorized the upstream is refused with a link
(`<authorize_url>?...&state=...`, one use, `link_ttl_seconds`); the authorization server redirects to
`<gateway>/oauth/callback`, where the code is exchanged and the tokens are sealed into the store under
the gateway user who asked for the link. Later calls carry that user's access token, refreshed with
the refresh token when it is about to expire. `castellan credentials revoke` deletes the grant: that
user's next call is refused (with a new link), nobody else's.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
import structlog
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from server.credentials.secrets import read_secret
from server.credentials.store import Grant, GrantStore
from server.credentials.token_endpoint import STAGE, TokenEndpoint
from server.errors import Denied
from server.identity import Identity
from server.settings import BrokeredOAuthSettings

log = structlog.get_logger("castellan.credentials")

CALLBACK_PATH = "/oauth/callback"


class BrokeredCredential:
    """The user's own grant at the upstream. Raises `Denied` naming the link when the user has none (or it
    was revoked, or its refresh was refused), `BackendUnavailable` when the authorization server is down."""

    mode = "brokered"

    def __init__(
        self, upstream: str, settings: BrokeredOAuthSettings, audience: str, store: GrantStore, gateway_base_url: str
    ) -> None:
        self.upstream = upstream
        self._settings = settings
        self._audience = settings.audience or audience
        self._store = store
        self.redirect_uri = f"{gateway_base_url.rstrip('/')}{CALLBACK_PATH}"
        has_secret = bool(settings.client_secret.env or settings.client_secret.file)
        what = f"upstream {upstream} oauth.client_secret"
        self._secret = read_secret(settings.client_secret, what) if has_secret else None
        self._locks: dict[str, asyncio.Lock] = {}
        self._endpoint = TokenEndpoint()

    async def close(self) -> None:
        """Close the pooled connections to the authorization server (at gateway shutdown)."""
        await self._endpoint.close()

    async def headers_for(self, identity: Identity | None) -> dict[str, str] | None:
        if identity is None or not identity.subject:
            raise Denied(STAGE, f"upstream {self.upstream} acts for a user, and this call names none")
        subject = identity.subject
        lock = self._locks.setdefault(subject, asyncio.Lock())
        async with lock:  # one refresh per user at a time (a rotated refresh token is good once)
            grant = await asyncio.to_thread(self._store.get, self.upstream, subject)
            if grant is None:
                raise Denied(STAGE, await self._authorize_first(subject))
            if grant.access_expires_at - 30 > time.time():
                return {"Authorization": f"Bearer {grant.access_token}"}
            return {"Authorization": f"Bearer {await self._refresh(grant)}"}

    async def _authorize_first(self, subject: str) -> str:
        link = await asyncio.to_thread(self.authorization_link, subject)
        return f"upstream {self.upstream} needs {subject}'s own authorization: open {link}"

    def authorization_link(self, subject: str) -> str:
        """A one-use link (valid `link_ttl_seconds`) for `subject` to authorize this upstream."""
        state, verifier = secrets.token_urlsafe(32), generate_token(64)
        self._store.begin(state, self.upstream, subject, verifier, self._settings.link_ttl_seconds)
        params = {
            "response_type": "code",
            "client_id": self._settings.client_id,
            "redirect_uri": self.redirect_uri,
            "state": state,
            "code_challenge": create_s256_code_challenge(verifier),
            "code_challenge_method": "S256",
            "audience": self._audience,
            "resource": self._audience,
        }
        if self._settings.scopes:
            params["scope"] = " ".join(self._settings.scopes)
        return f"{self._settings.authorize_url}?{urlencode(params)}"

    async def complete(self, subject: str, code: str, code_verifier: str) -> str:
        """Exchanges the callback's code (PKCE), seals the tokens for `subject`; returns the granted scope."""
        body = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": code_verifier,
            }
        )
        scope = str(body.get("scope", " ".join(self._settings.scopes)))
        await asyncio.to_thread(
            self._store.put,
            self.upstream,
            subject,
            body["access_token"],
            _expires_at(body),
            body.get("refresh_token"),
            scope,
        )
        log.info("brokered_grant_stored", upstream=self.upstream, subject=subject, scope=scope)
        return scope

    async def _refresh(self, grant: Grant) -> str:
        if not grant.refresh_token:
            await asyncio.to_thread(self._store.revoke, self.upstream, grant.subject)
            raise Denied(STAGE, await self._authorize_first(grant.subject))
        try:
            body = await self._token_request({"grant_type": "refresh_token", "refresh_token": grant.refresh_token})
        except Denied:  # the grant was revoked at the authorization server, or expired: authorize again
            await asyncio.to_thread(self._store.revoke, self.upstream, grant.subject)
            raise Denied(STAGE, await self._authorize_first(grant.subject)) from None
        await asyncio.to_thread(
            self._store.put,
            self.upstream,
            grant.subject,
            body["access_token"],
            _expires_at(body),
            body.get("refresh_token"),  # rotated, or None: the old one is kept
            str(body.get("scope", grant.scope)),
        )
        return str(body["access_token"])

    async def _token_request(self, form: dict[str, str]) -> dict[str, Any]:
        auth = aiohttp.BasicAuth(self._settings.client_id, self._secret) if self._secret else None
        if auth is None:
            form = {**form, "client_id": self._settings.client_id}
        status, body = await self._endpoint.post_form(
            self._settings.token_url,
            form,
            auth,
            self._settings.timeout_seconds,
            f"upstream {self.upstream}: authorization server unreachable",
        )
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            error = body.get("error", f"HTTP {status}") if isinstance(body, dict) else f"HTTP {status}"
            log.info("brokered_token_refused", upstream=self.upstream, grant_type=form["grant_type"], error=error)
            raise Denied(STAGE, f"upstream {self.upstream}: authorization server refused: {error}")
        return body


def _expires_at(body: dict[str, Any]) -> float:
    expires_in = body.get("expires_in")
    seconds = float(expires_in) if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) else 60.0
    return time.time() + seconds
