"""Client ID metadata documents are fetched only from public addresses, resolved once (SSRF bounds)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from server.auth.issuer import client_documents
from server.auth.issuer.client_documents import ClientDocumentError, ClientDocuments, PinnedResolver, resolve_public

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:9/client.json",
        "https://localhost:9/client.json",
        "https://[::1]:9/client.json",
        "https://[::ffff:127.0.0.1]:9/client.json",
        "https://10.1.2.3:9/client.json",
        "https://192.168.0.7:9/client.json",
        "https://169.254.169.254/latest/meta-data/client.json",
        "https://100.64.0.1:9/client.json",
        "https://0.0.0.0:9/client.json",
    ],
)
async def test_a_document_on_a_loopback_private_or_link_local_address_is_not_fetched(url: str) -> None:
    with pytest.raises(ClientDocumentError, match="not a public address"):
        await ClientDocuments({}).resolve(url)


async def test_a_name_that_resolves_to_a_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def getaddrinfo(self: Any, host: str, port: int, **_: Any) -> list[Any]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(client_documents.asyncio.get_running_loop().__class__, "getaddrinfo", getaddrinfo)
    with pytest.raises(ClientDocumentError, match=r"10\.0\.0\.5, which is not a public address"):
        await resolve_public("docs.example", 443, allow_private=False)
    allowed = await resolve_public("docs.example", 443, allow_private=True)
    assert [a["host"] for a in allowed] == ["93.184.215.14", "10.0.0.5"]


async def test_the_connection_goes_to_the_checked_address_not_a_second_lookup() -> None:
    checked = await resolve_public("127.0.0.1", 443, allow_private=True)
    pinned = PinnedResolver("docs.example", [{**checked[0], "hostname": "docs.example"}])
    assert [a["host"] for a in await pinned.resolve("docs.example", 443)] == ["127.0.0.1"]
    with pytest.raises(OSError, match="not resolved and checked"):
        await pinned.resolve("elsewhere.example", 443)
