"""Clients nobody on this project wrote, against the real gateway: OpenAI's Agents SDK, an `mcp` 1.x
client with LangChain's adapters (in their own environment), and a stdio-only client through
`castellan connect`. Each lists with a bearer token, calls a tool, and sees a denial as a tool error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from server.settings import REPO_ROOT
from tests.gateway_process import ANALYST_TOOLS, GatewayProcess, castellan

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
MCP1_PYTHON = REPO_ROOT / ".cache" / "interop" / "mcp1" / "bin" / "python"


async def test_openai_agents_sdk_lists_calls_and_sees_a_denial(gateway: GatewayProcess) -> None:
    from agents.mcp import MCPServerStreamableHttp

    token = gateway.token("openai-agent", ["analysts"])
    params = {"url": gateway.mcp_url, "headers": {"Authorization": f"Bearer {token}"}}
    async with MCPServerStreamableHttp(params=params, name="castellan", cache_tools_list=False) as server:  # type: ignore[arg-type]
        assert sorted(t.name for t in await server.list_tools()) == ANALYST_TOOLS
        echoed = await server.call_tool("echo", {"text": "from openai-agents"})
        assert echoed.structured_content == {"text": "from openai-agents"}
        denied = await server.call_tool("demo.reset", {})
    assert denied.is_error
    assert json.loads(denied.content[0].text)["stage"] == "grants"


async def test_openai_agents_sdk_gives_the_model_function_names_openai_accepts(gateway: GatewayProcess) -> None:
    """OpenAI function names allow only [A-Za-z0-9_-]: `sql.query` as a function name is refused by the API.
    The SDK's `include_server_in_tool_names` maps every tool to such a name and calls it by its real one."""
    import re

    from agents import Agent, RunContextWrapper
    from agents.mcp import MCPServerStreamableHttp
    from agents.tool_context import ToolContext

    token = gateway.token("openai-agent", ["analysts"])
    params = {"url": gateway.mcp_url, "headers": {"Authorization": f"Bearer {token}"}}
    async with MCPServerStreamableHttp(params=params, name="castellan") as server:  # type: ignore[arg-type]
        agent = Agent(name="analyst", mcp_servers=[server], mcp_config={"include_server_in_tool_names": True})
        tools = {t.name: t for t in await agent.get_all_tools(RunContextWrapper(context=None))}
        assert len(tools) == len(ANALYST_TOOLS)
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) for name in tools), sorted(tools)
        sql = tools["mcp_castellan__sql_query"]
        arguments = json.dumps({"query": "SELECT COUNT(*) AS n FROM main.sales.orders"})
        context = ToolContext(context=None, tool_name=sql.name, tool_call_id="c1", tool_arguments=arguments)
        answered = await sql.on_invoke_tool(context, arguments)  # type: ignore[attr-defined]
    assert json.loads(answered["text"])["rows"] == [[60]]


def test_an_mcp_1x_client_and_langchain_adapters(gateway: GatewayProcess) -> None:
    if not MCP1_PYTHON.exists():
        pytest.fail("the mcp 1.x environment is missing: run scripts/install-test-deps")
    token = gateway.token("langchain-agent", ["analysts"])
    done = subprocess.run(
        [str(MCP1_PYTHON), str(REPO_ROOT / "tests" / "interop" / "mcp1_client.py"), gateway.mcp_url, token],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["protocol"] == "2025-11-25"
    assert report["tools"] == ANALYST_TOOLS
    assert report["echo"] == {"text": "from mcp 1.x"}
    assert report["denied"]["isError"] is True
    assert "missing privilege" in report["denied"]["text"]
    assert report["langchain_tools"] == ANALYST_TOOLS
    assert "from langchain" in report["langchain_echo"]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_stdio_client_through_castellan_connect(gateway: GatewayProcess, mode: str) -> None:
    token = gateway.token("desktop-agent", ["analysts"])
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "server", "connect", gateway.mcp_url],
        env={**os.environ, "CASTELLAN_TOKEN": token},
    )
    async with Client(stdio_client(params), mode=mode) as client:  # type: ignore[arg-type]
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        assert sorted(t.name for t in (await client.list_tools()).tools) == ANALYST_TOOLS
        echoed = await client.call_tool("echo", {"text": "over stdio"})
        assert echoed.structured_content == {"text": "over stdio"}
        denied = await client.call_tool("demo.reset", {})
    assert denied.is_error
    assert json.loads(denied.content[0].text)["decision"] == "deny"


def test_castellan_connect_without_a_token_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CASTELLAN_TOKEN"}
    done = castellan("connect", "http://127.0.0.1:9/mcp", env=env, timeout=60)
    assert done.returncode != 0
    assert "no token" in done.stderr
