"""server-everything (the MCP reference server, pinned) behind Castellan: its sampling, elicitation,
roots, progress and cancellation reach the agent through the gateway and its governance, with the
official Python client in both eras and with the TypeScript SDK client. Real processes: server-everything
on Node 22, the gateway (`castellan serve`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.audit_trail import settled_audit
from tests.e2e.conftest import E2E, run_node
from tests.everything_server import run_everything
from tests.gateway_process import GatewayProcess, run_gateway

pytestmark = pytest.mark.e2e
MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def everything_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with run_everything() as everything:
        upstreams = [{"name": "everything", "url": everything.url, "prefix": "everything."}]
        env = {"CASTELLAN_UPSTREAMS": json.dumps(upstreams)}
        with run_gateway(tmp_path_factory.mktemp("everything") / "gw", env, timeout=120) as gw:
            yield gw


class Agent:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def sampling(self, ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.asked.append("sampling")
        text = types.TextContent(type="text", text="a sampled answer")
        return types.CreateMessageResult(role="assistant", content=text, model="agent-model", stop_reason="endTurn")

    async def elicitation(self, ctx: Any, params: Any) -> types.ElicitResult:
        self.asked.append("elicitation")
        return types.ElicitResult(action="accept", content={"name": "Ada Lovelace", "check": True})

    async def roots(self, ctx: Any) -> types.ListRootsResult:
        self.asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/project", name="project")])


def text_of(result: types.CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def audit(gw: GatewayProcess, tool: str) -> list[dict[str, Any]]:
    return settled_audit(gw, "--tool", tool)  # the outcomes are group-committed after the response


@pytest.mark.parametrize("mode", ["legacy", MODERN])
def test_everythings_relayed_features_through_the_gateway(everything_gateway: GatewayProcess, mode: str) -> None:
    gw = everything_gateway
    agent = Agent()
    progress: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    async def run() -> dict[str, types.CallToolResult]:
        http = httpx.AsyncClient(headers={"Authorization": f"Bearer {gw.token(f'everything-{mode}', ['admins'])}"})
        async with Client(
            streamable_http_client(gw.mcp_url, http_client=http), mode=mode,  # type: ignore[arg-type]
            sampling_callback=agent.sampling, elicitation_callback=agent.elicitation, list_roots_callback=agent.roots,
        ) as client:  # fmt: skip
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"everything.trigger-sampling-request", "everything.trigger-elicitation-request"} <= names
            return {
                "sample": await client.call_tool("everything.trigger-sampling-request", {"prompt": f"hi ({mode})"}),
                "elicit": await client.call_tool("everything.trigger-elicitation-request", {}),
                "roots": await client.call_tool("everything.get-roots-list", {}),
                "progress": await client.call_tool(
                    "everything.trigger-long-running-operation",
                    {"duration": 0.6, "steps": 3},
                    progress_callback=on_progress,
                ),
            }

    results = asyncio.run(run())
    assert "a sampled answer" in text_of(results["sample"])
    assert "Ada Lovelace" in text_of(results["elicit"])
    assert "file:///srv/project" in text_of(results["roots"])
    assert progress == [1, 2, 3]
    assert agent.asked[:2] == ["sampling", "elicitation"]
    assert "roots" in agent.asked
    record = next(
        r for r in audit(gw, "everything.trigger-sampling-request") if f"({mode})" in json.dumps(r["arguments"])
    )
    assert [(s["action"], s["decision"], s["upstream"]) for s in record["outcome"]["relayed"]] == [
        ("sample", "allow", "everything")
    ]


def test_the_typescript_client_is_sampled_and_asked_through_the_gateway(
    node: Path, tmp_path: Path, everything_gateway: GatewayProcess
) -> None:
    gw = everything_gateway
    script = E2E / "clients" / "ts_relay_client.mjs"
    run = run_node(node, script, [gw.mcp_url, gw.token("ts-relay", ["admins"])], home=tmp_path, timeout=120)
    assert run.code == 0, run.stderr
    result: Any = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["asked"] == ["sampling", "elicitation"]
    assert "a sampled answer from ts" in result["sample"]
    assert "Grace Hopper" in result["elicit"]
    assert result["progress"] == [1, 2, 3]
