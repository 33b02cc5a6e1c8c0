"""Where verification keys come from: a JWKS URL, a JWKS file, or the local dev key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from server.auth.strict_json import loads_strict
from server.errors import ConfigError

log = structlog.get_logger("castellan.auth")


class KeySource(Protocol):
    """Public keys of the token issuer. `key_set(refresh=True)` is asked once for an unknown `kid`.

    Raises `KeyUnavailable` when the keys cannot be had: the request is then refused (fail closed).
    """

    async def key_set(self, *, refresh: bool = False) -> KeySet: ...


class KeyUnavailable(Exception):
    """The issuer's keys could not be fetched or parsed."""


def parse_jwks(document: str | bytes, origin: str) -> KeySet:
    try:
        data = loads_strict(document)  # a key document read two ways is as bad as a token read two ways
        keys = KeySet.import_key_set(data)
    except (ValueError, JoseError, TypeError, KeyError) as exc:
        raise KeyUnavailable(f"{origin} is not a valid JWKS document: {exc}") from exc
    if not keys.keys:
        raise KeyUnavailable(f"{origin} holds no keys")
    return keys


class StaticKeys:
    """Keys read once from a JWKS file (or handed in): for issuers whose keys are deployed with config."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: Path) -> StaticKeys:
        try:
            return cls(parse_jwks(path.read_bytes(), str(path)))
        except (OSError, KeyUnavailable) as exc:
            raise ConfigError(f"cannot read keys file: {exc}") from exc

    async def key_set(self, *, refresh: bool = False) -> KeySet:
        return self._keys


class JwksKeys:
    """Keys fetched from a JWKS URL, cached for `ttl` seconds. A refresh for an unknown `kid` is
    rate-limited to one per `min_refresh` seconds, so forged kids cannot make us hammer the issuer.
    A stale cache is used while the issuer is unreachable; with no cache at all, `KeyUnavailable`."""

    def __init__(self, url: str, *, ttl: float = 300.0, min_refresh: float = 10.0, timeout: float = 5.0) -> None:
        self.url = url
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._timeout = timeout
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def key_set(self, *, refresh: bool = False) -> KeySet:
        now = time.monotonic()
        fresh = self._keys is not None and now - self._fetched_at < self._ttl
        may_refresh = now - self._fetched_at >= self._min_refresh
        if self._keys is not None and (fresh and not (refresh and may_refresh)):
            return self._keys
        async with self._lock:
            if self._keys is not None and time.monotonic() - self._fetched_at < self._min_refresh:
                return self._keys
            try:
                self._keys = await self._fetch()
                self._fetched_at = time.monotonic()
            except KeyUnavailable as exc:
                if self._keys is None:
                    raise
                log.warning("jwks_refresh_failed", url=self.url, error=str(exc))
            return self._keys

    async def _fetch(self) -> KeySet:
        try:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as resp:
                if resp.status != 200:
                    raise KeyUnavailable(f"{self.url} answered HTTP {resp.status}")
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KeyUnavailable(f"cannot fetch {self.url}: {exc}") from exc
        return parse_jwks(body, self.url)
