"""Runs in its own environment with `mcp` 1.x and `langchain-mcp-adapters` (not the project's venv):
lists and calls the gateway's tools the way a LangChain agent does, and prints what it saw as JSON.

    python mcp1_client.py URL TOKEN
"""

import asyncio
import json
import sys


async def main(url: str, token: str) -> None:
    from langchain_mcp_adapters.client import MultiServerMCPClient
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    headers = {"Authorization": f"Bearer {token}"}
    report = {}
    # The plain mcp 1.x client (initialize handshake, sessions).
    async with streamablehttp_client(url, headers=headers) as (read, write, _), ClientSession(read, write) as session:
        init = await session.initialize()
        report["protocol"] = init.protocolVersion
        report["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
        echoed = await session.call_tool("echo", {"text": "from mcp 1.x"})
        report["echo"] = echoed.structuredContent
        denied = await session.call_tool("demo.reset", {})
        report["denied"] = {"isError": denied.isError, "text": denied.content[0].text}
    # LangChain's adapters on top of it.
    client = MultiServerMCPClient({"castellan": {"url": url, "transport": "streamable_http", "headers": headers}})
    tools = {t.name: t for t in await client.get_tools()}
    report["langchain_tools"] = sorted(tools)
    report["langchain_echo"] = str(await tools["echo"].ainvoke({"text": "from langchain"}))
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
