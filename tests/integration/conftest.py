"""Integration fixtures: a real gateway process on a loopback port, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway_process import GatewayProcess, run_cli, run_gateway


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with run_gateway(tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


def cli_token(gateway: GatewayProcess, agent: str, groups: str = "", *extra: str) -> str:
    """A token minted the way a user does it: `castellan token`, against the gateway's settings."""
    done = run_cli(gateway, "token", "--agent", agent, "--groups", groups, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def raw_call(gateway: GatewayProcess, token: str, tool: str, arguments: dict[str, object]) -> dict[str, object]:
    """One 2026-07-28 `tools/call` over plain HTTP; returns the JSON-RPC result (a CallToolResult)."""
    import json

    import aiohttp

    from bench.load import call_body, call_headers

    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.mcp_url, data=call_body(tool, arguments, 1), headers=call_headers(tool, token)) as resp,
    ):
        payload = json.loads(await resp.text())
    result = payload["result"]
    assert isinstance(result, dict)
    return result


def deny_body(result: dict[str, object]) -> dict[str, object]:
    import json

    assert result["isError"] is True, result
    content = result["content"]
    assert isinstance(content, list)
    body = json.loads(content[0]["text"])
    assert isinstance(body, dict)
    return body
