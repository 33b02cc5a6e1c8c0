"""Token requests share one pooled session per credential, closed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from server.credentials.exchange import TokenExchanger
from server.credentials.token_endpoint import TokenEndpoint
from server.errors import BackendUnavailable
from server.settings import SecretSource, TokenExchangeSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def token_service() -> AsyncIterator[tuple[str, list[Any]]]:
    """A loopback token endpoint that answers every form with a fresh token and records each request's
    client address (one pooled connection shows as one address)."""
    peers: list[Any] = []

    async def token(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        form = await request.post()
        return web.json_response({"access_token": f"t-{len(peers)}-{form.get('subject_token', '')}",
                                  "token_type": "Bearer", "expires_in": 600})  # fmt: skip

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/token", peers
    await runner.cleanup()


async def test_successive_exchanges_reuse_one_connection_and_close_frees_it(
    token_service: tuple[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, peers = token_service
    monkeypatch.setenv("TE_SECRET", "s3cret")
    settings = TokenExchangeSettings(token_url=url, client_id="gw", client_secret=SecretSource(env="TE_SECRET"))
    exchanger = TokenExchanger("docs", settings, "http://docs.example/mcp")
    assert await exchanger.token_for("alice-token") == "t-1-alice-token"
    assert await exchanger.token_for("bob-token") == "t-2-bob-token"
    assert len(peers) == 2
    assert peers[0] == peers[1]  # one kept-alive connection, not one per exchange
    await exchanger.close()
    with pytest.raises(BackendUnavailable, match="shutting down"):
        await exchanger.token_for("carol-token")


async def test_an_unreachable_token_endpoint_is_backend_unavailable() -> None:
    endpoint = TokenEndpoint()
    with pytest.raises(BackendUnavailable, match="token service unreachable"):
        await endpoint.post_form("http://127.0.0.1:9/token", {}, None, 2.0, "upstream x: token service unreachable")
    await endpoint.close()
