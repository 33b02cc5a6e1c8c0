"""The lean upstream client against a real mcp SDK server, in both eras: the result the SDK client gets,
its own 2025-era session, and a new session when the upstream has forgotten it."""

from __future__ import annotations

import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from server.upstream.http_client import HttpUpstreamClient
from tests.integration.test_edge_paths import upstream

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.mark.parametrize("version", ["2026-07-28", "2025-11-25"])
async def test_the_lean_client_gets_the_result_the_sdk_client_gets(version: str) -> None:
    with upstream() as url:
        async with Client(streamable_http_client(url), mode="auto") as sdk:
            expected = await sdk.call_tool("echo", {"text": "same"})
        lean = HttpUpstreamClient(url, {}, version, timeout_seconds=30)
        try:
            got = await lean.call_tool("echo", {"text": "same"})
            again = await lean.call_tool("echo", {"text": "again"})
        finally:
            await lean.close()
    assert got.content == [block.model_dump(mode="json", exclude_none=True) for block in expected.content]
    assert got.structured_content == expected.structured_content == {"text": "same"}
    assert got.is_error is expected.is_error is False
    assert again.structured_content == {"text": "again"}


async def test_a_forgotten_session_is_opened_again() -> None:
    lean = HttpUpstreamClient("", {}, "2025-11-25", timeout_seconds=30)
    try:
        with upstream() as first:
            lean.url = first
            assert (await lean.call_tool("echo", {"text": "one"})).structured_content == {"text": "one"}
        with upstream() as second:  # a restarted upstream: the old session id answers 404
            lean.url = second
            assert (await lean.call_tool("echo", {"text": "two"})).structured_content == {"text": "two"}
    finally:
        await lean.close()
