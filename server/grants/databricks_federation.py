"""Databricks OAuth token federation: the caller's token exchanged at the workspace for a Databricks token of its own.

Databricks documents it as OAuth 2.0 token exchange (RFC 8693) at the workspace's token endpoint
("Authenticate with an identity provider token"): `POST <host>/oidc/v1/token` with the form
`grant_type=urn:ietf:params:oauth:grant-type:token-exchange`, `subject_token=<the IdP's JWT>`,
`subject_token_type=urn:ietf:params:oauth:token-type:jwt`, `scope=all-apis` (and `client_id` for a
service principal's federation policy), answered with `access_token`, `token_type`, `expires_in`.
The workspace checks the JWT against its federation policy and maps it to its own user or service
principal, whose grants then decide every Unity Catalog call made with the token.

The caller's token goes to this endpoint only, never to a Unity Catalog API or anywhere else.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog

from server.auth.presented import PresentedTokens
from server.credentials.token_endpoint import STAGE, TokenEndpoint
from server.errors import Denied
from server.identity import Identity

log = structlog.get_logger("castellan.grants")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
LEEWAY_SECONDS = 60
"""A cached token is not used in its last minute: a call that starts with it must not see it expire."""


@dataclass(frozen=True, slots=True)
class FederatedToken:
    """A Databricks token for one caller, usable until `usable_until` (epoch seconds)."""

    access_token: str
    usable_until: float


class DatabricksTokenFederation:
    """Federates each caller's presented token at `<host>/oidc/v1/token`, caching the Databricks token
    per subject (issuer and subject) until `LEEWAY_SECONDS` before it, or the caller's own token,
    expires. Bounded LRU, memory only; one federation per subject at a time.

    Raises `Denied` (stage `credentials`) when there is no caller token to federate or the workspace
    refuses it (its `error` and description in the reason), `BackendUnavailable` when the endpoint
    cannot be reached. Never falls back to the gateway's own credentials. Its requests share one pooled
    session (`TokenEndpoint`), closed by `close()` at gateway shutdown."""

    def __init__(
        self,
        host: str,
        presented: PresentedTokens,
        scopes: tuple[str, ...] = ("all-apis",),
        client_id: str = "",
        timeout_seconds: float = 10.0,
        max_entries: int = 10_000,
    ) -> None:
        self.token_url = f"{host.rstrip('/')}/oidc/v1/token"
        self._presented = presented
        self._scopes = scopes
        self._client_id = client_id
        self._timeout = timeout_seconds
        self._max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str], FederatedToken] = OrderedDict()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._endpoint = TokenEndpoint()

    async def token_for(self, identity: Identity | None) -> str:
        if identity is None:
            raise Denied(STAGE, "databricks on-behalf-of-user: the call has no caller identity to act for")
        key = (identity.issuer, identity.subject)
        cached = self._cached(key)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent calls of one subject share one federation
            cached = self._cached(key)
            if cached is None:
                subject_token = self._presented.token_of(identity)
                if subject_token is None:
                    raise Denied(STAGE, "databricks on-behalf-of-user: the caller's token is not at hand to federate")
                token = await self._federate(subject_token, identity)
                self._cache[key] = token
                if len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
                cached = token.access_token
        self._locks.pop(key, None)
        return cached

    def _cached(self, key: tuple[str, str]) -> str | None:
        token = self._cache.get(key)
        if token is None:
            return None
        if token.usable_until <= time.time():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return token.access_token

    async def close(self) -> None:
        """Close the pooled session; a federation after this raises `BackendUnavailable`."""
        await self._endpoint.close()

    def forget(self, identity: Identity | None, token: str) -> None:
        """Drop `identity`'s cached `token` (the workspace refused it): its next call federates again."""
        if identity is None:
            return
        key = (identity.issuer, identity.subject)
        cached = self._cache.get(key)
        if cached is not None and cached.access_token == token:
            del self._cache[key]

    async def _federate(self, subject_token: str, identity: Identity) -> FederatedToken:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": JWT_TOKEN_TYPE,
            "scope": " ".join(self._scopes),
        }
        if self._client_id:
            form["client_id"] = self._client_id
        status, body = await self._endpoint.post_form(
            self.token_url, form, None, self._timeout, f"databricks token federation unreachable at {self.token_url}"
        )
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            error = body.get("error", f"HTTP {status}") if isinstance(body, dict) else f"HTTP {status}"
            description = body.get("error_description", "") if isinstance(body, dict) else ""
            log.info("databricks_federation_refused", subject=identity.subject, error=error, description=description)
            reason = f"databricks on-behalf-of-user: the workspace refused to federate the caller's token: {error}"
            raise Denied(STAGE, f"{reason}: {description}"[:300] if description else reason)
        if str(body.get("token_type", "Bearer")).lower() != "bearer":
            kind = body.get("token_type")
            raise Denied(
                STAGE, f"databricks on-behalf-of-user: the workspace issued a {kind!r} token, not a bearer token"
            )
        lifetime = body.get("expires_in")
        lifetime = lifetime if isinstance(lifetime, int | float) and not isinstance(lifetime, bool) else 60
        until = time.time() + float(lifetime) - LEEWAY_SECONDS
        if identity.expires_at is not None:  # never outlive the token it stands for
            until = min(until, identity.expires_at - LEEWAY_SECONDS)
        return FederatedToken(str(body["access_token"]), until)
