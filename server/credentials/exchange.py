"""The gateway as an RFC 8693 client: the caller's token exchanged for one for an upstream's audience."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict

import aiohttp
import structlog
from authlib.oauth2.rfc6749 import OAuth2Token

from server.credentials.secrets import read_secret
from server.credentials.token_endpoint import STAGE, TokenEndpoint
from server.errors import Denied
from server.settings import TokenExchangeSettings

log = structlog.get_logger("castellan.credentials")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class TokenExchanger:
    """Exchanges at `settings.token_url` (client_secret_basic as `settings.client_id`), caching each
    result per (subject token, audience) until 30 s before it expires. Bounded LRU, memory only.

    Raises `Denied` when the token service refuses (its `error` and description in the reason) and
    `BackendUnavailable` when it cannot be reached: the call is then not made (fail closed)."""

    def __init__(
        self, upstream: str, settings: TokenExchangeSettings, audience: str, max_entries: int = 10_000
    ) -> None:
        self._upstream = upstream
        self._settings = settings
        self.audience = settings.audience or audience
        self._secret = read_secret(settings.client_secret, f"upstream {upstream} token_exchange.client_secret")
        self._cache: OrderedDict[bytes, OAuth2Token] = OrderedDict()
        self._max_entries = max_entries
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._endpoint = TokenEndpoint()

    async def close(self) -> None:
        """Close the pooled connections to the token service (at gateway shutdown)."""
        await self._endpoint.close()

    async def token_for(self, subject_token: str) -> str:
        key = hashlib.sha256(subject_token.encode()).digest()
        cached = self._cached(key)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one exchange per subject token at a time; the others use its result
            cached = self._cached(key)
            if cached is None:
                token = await self._exchange(subject_token)
                self._cache[key] = token
                if len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
                cached = str(token["access_token"])
        self._locks.pop(key, None)
        return cached

    def _cached(self, key: bytes) -> str | None:
        token = self._cache.get(key)
        if token is None:
            return None
        if token.is_expired(leeway=30):
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return str(token["access_token"])

    async def _exchange(self, subject_token: str) -> OAuth2Token:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "audience": self.audience,
        }
        if self._settings.scopes:
            form["scope"] = " ".join(self._settings.scopes)
        auth = aiohttp.BasicAuth(self._settings.client_id, self._secret)
        status, body = await self._endpoint.post_form(
            self._settings.token_url,
            form,
            auth,
            self._settings.timeout_seconds,
            f"upstream {self._upstream}: token service unreachable",
        )
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            error = body.get("error", f"HTTP {status}") if isinstance(body, dict) else f"HTTP {status}"
            description = body.get("error_description", "") if isinstance(body, dict) else ""
            log.info("token_exchange_refused", upstream=self._upstream, error=error, description=description)
            raise Denied(STAGE, f"upstream {self._upstream}: token exchange refused: {error}: {description}"[:300])
        if body.get("token_type", "Bearer").lower() != "bearer":
            raise Denied(STAGE, f"upstream {self._upstream}: token service issued a {body.get('token_type')!r} token")
        token = OAuth2Token.from_dict(body)
        if "expires_at" not in token:
            token["expires_at"] = int(time.time()) + 60  # no lifetime given: do not keep it long
        return token
