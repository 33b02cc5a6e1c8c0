"""JWKS URL keys against a real local HTTP server: fetch, cache, refresh on an unknown kid, and a
stale cache kept while the issuer is down."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from joserfc.jwk import ECKey, KeySet

from server.auth.keys import JwksKeys, KeyUnavailable
from tests.fakes.loopback import serve_app

pytestmark = pytest.mark.anyio


class Issuer:
    def __init__(self) -> None:
        self.keys = [ECKey.generate_key("P-256", parameters={"kid": "k1"})]
        self.hits = 0
        self.up = True

    async def jwks(self, request: web.Request) -> web.Response:
        self.hits += 1
        if not self.up:
            return web.Response(status=503)
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})


@pytest.fixture
async def issuer() -> AsyncIterator[tuple[Issuer, str]]:
    state = Issuer()
    app = web.Application()
    app.router.add_get("/jwks", state.jwks)
    async with serve_app(app) as url:
        yield state, f"{url}/jwks"


def kids(keys: KeySet) -> list[str | None]:
    return [k.kid for k in keys.keys]


async def test_keys_are_fetched_once_and_cached(issuer: tuple[Issuer, str]) -> None:
    state, url = issuer
    source = JwksKeys(url, ttl=60)
    assert kids(await source.key_set()) == ["k1"]
    await source.key_set()
    assert state.hits == 1


async def test_an_unknown_kid_refreshes_the_keys_after_rotation(issuer: tuple[Issuer, str]) -> None:
    state, url = issuer
    source = JwksKeys(url, ttl=60, min_refresh=0)
    await source.key_set()
    state.keys.append(ECKey.generate_key("P-256", parameters={"kid": "k2"}))
    assert kids(await source.key_set(refresh=True)) == ["k1", "k2"]


async def test_refreshes_are_rate_limited(issuer: tuple[Issuer, str]) -> None:
    state, url = issuer
    source = JwksKeys(url, ttl=60, min_refresh=30)
    await source.key_set()
    for _ in range(5):
        await source.key_set(refresh=True)  # forged kids must not make us hammer the issuer
    assert state.hits == 1


async def test_a_stale_cache_is_used_while_the_issuer_is_down(issuer: tuple[Issuer, str]) -> None:
    state, url = issuer
    source = JwksKeys(url, ttl=0, min_refresh=0)
    await source.key_set()
    state.up = False
    assert kids(await source.key_set()) == ["k1"]


async def test_no_keys_at_all_is_an_error(issuer: tuple[Issuer, str]) -> None:
    state, url = issuer
    state.up = False
    with pytest.raises(KeyUnavailable, match="answered HTTP 503"):
        await JwksKeys(url).key_set()


async def test_a_document_that_is_not_a_jwks_is_an_error(issuer: tuple[Issuer, str]) -> None:
    state, url = issuer
    state.keys = []
    with pytest.raises(KeyUnavailable, match="is not a valid JWKS document"):
        await JwksKeys(url).key_set()


async def test_an_unreachable_issuer_is_an_error() -> None:
    with pytest.raises(KeyUnavailable, match="cannot fetch"):
        await JwksKeys("http://127.0.0.1:9/jwks", timeout=1).key_set()
