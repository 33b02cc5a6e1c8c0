"""What an upstream tool raises during a call reaches the agent through Castellan, governed and audited:
sampling, elicitation and roots requests (2025-era server-to-client requests, and 2026-07-28
input-required rounds with sealed request state), each decided by policy and recorded as a child
span of the call. Real processes: the gateway (`castellan serve`) and an `mcp` SDK upstream
(tests/fixtures/conformance_server.py); the agent is the official Python client."""

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
from mcp.shared.exceptions import MCPError

from tests.audit_trail import settled_audit
from tests.gateway_process import GatewayProcess, run_gateway
from tests.mcp_upstream import conformance_upstream, policies_with_upstreams

pytestmark = pytest.mark.integration
MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("relay")
    policies = policies_with_upstreams(root, {"nosample": {"forbid": ["sample"]}})
    with conformance_upstream() as url:
        upstreams = [
            {"name": "fixture", "url": url, "prefix": ""},
            {"name": "nosample", "url": url, "prefix": "nosample."},
        ]
        env = {"CASTELLAN_UPSTREAMS": json.dumps(upstreams), "CASTELLAN_POLICY__PATH": str(policies)}
        with run_gateway(root / "gw", env, timeout=120) as gw:  # a loaded 2-core machine starts it slowly
            yield gw


class Agent:
    """What the agent's client answers, and what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def sampling(self, ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.asked.append("sampling")
        text = types.TextContent(type="text", text="Paris")
        return types.CreateMessageResult(role="assistant", content=text, model="agent-model", stop_reason="endTurn")

    async def elicitation(self, ctx: Any, params: Any) -> types.ElicitResult:
        self.asked.append("elicitation")
        return types.ElicitResult(
            action="accept", content={"username": "alice", "email": "a@example.com", "name": "Alice"}
        )

    async def roots(self, ctx: Any) -> types.ListRootsResult:
        self.asked.append("roots")
        return types.ListRootsResult(roots=[types.Root(uri="file:///work/project", name="project")])


def connect(gw: GatewayProcess, agent: Agent, mode: str) -> Client:
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {gw.token('relay-agent', ['admins'])}"})
    return Client(
        streamable_http_client(gw.mcp_url, http_client=http),
        mode=mode,  # type: ignore[arg-type]
        sampling_callback=agent.sampling,
        elicitation_callback=agent.elicitation,
        list_roots_callback=agent.roots,
    )


def text_of(result: types.CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def audit(gw: GatewayProcess, tool: str) -> list[dict[str, Any]]:
    return settled_audit(gw, "--tool", tool)  # the outcomes are group-committed after the response


@pytest.mark.parametrize("mode", ["legacy", MODERN])
def test_an_upstream_samples_and_elicits_through_the_gateway(gateway: GatewayProcess, mode: str) -> None:
    agent = Agent()

    async def run() -> tuple[types.CallToolResult, types.CallToolResult]:
        async with connect(gateway, agent, mode) as client:
            sampled = await client.call_tool("test_sampling", {"prompt": f"capital of France? ({mode})"})
            elicited = await client.call_tool("test_elicitation", {"message": f"who are you? ({mode})"})
            return sampled, elicited

    sampled, elicited = asyncio.run(run())
    assert text_of(sampled) == "LLM response: Paris"
    assert "action=accept" in text_of(elicited)
    assert "alice" in text_of(elicited)
    assert agent.asked == ["sampling", "elicitation"]
    record = next(r for r in audit(gateway, "test_sampling") if f"({mode})" in json.dumps(r["arguments"]))
    [span] = record["outcome"]["relayed"]
    assert span["action"] == "sample"
    assert span["decision"] == "allow"
    assert span["outcome"] == "answered"
    assert span["upstream"] == "fixture"
    assert span["tokens"] > 0


def test_input_required_rounds_keep_the_upstreams_keys_and_seal_the_state(gateway: GatewayProcess) -> None:
    agent = Agent()

    async def run() -> None:
        async with connect(gateway, agent, MODERN) as client:
            first = await client.session.call_tool(
                "test_input_required_result_multiple_inputs", {}, allow_input_required=True
            )
            assert isinstance(first, types.InputRequiredResult)
            assert set(first.input_requests or {}) == {"user_name", "greeting", "client_roots"}
            state = first.request_state
            assert state
            assert "round" not in state
            with pytest.raises(MCPError) as tampered:
                await client.session.call_tool(
                    "test_input_required_result_multiple_inputs", {}, request_state=state + "x",
                    input_responses={}, allow_input_required=True,
                )  # fmt: skip
            assert tampered.value.error.code == types.INVALID_PARAMS
            done = await client.call_tool("test_input_required_result_multi_round", {})
            assert "step2" in text_of(done)

    asyncio.run(run())
    assert agent.asked.count("elicitation") == 2  # the two rounds of multi_round


@pytest.mark.parametrize("mode", ["legacy", MODERN])
def test_policy_forbids_an_upstream_to_sample_the_agents_model(gateway: GatewayProcess, mode: str) -> None:
    agent = Agent()

    async def run() -> types.CallToolResult:
        async with connect(gateway, agent, mode) as client:
            return await client.call_tool("nosample.test_sampling", {"prompt": f"forbidden ({mode})"})

    result = asyncio.run(run())
    assert agent.asked == []  # the request never reached the agent
    assert result.is_error
    assert "upstream nosample may not sample through the agent" in text_of(result)
    record = next(r for r in audit(gateway, "nosample.test_sampling") if f"({mode})" in json.dumps(r["arguments"]))
    [span] = record["outcome"]["relayed"]
    assert span["decision"] == "deny"
    assert span["stage"] == "policy"
    assert span["upstream"] == "nosample"


def test_policy_refuses_an_elicitation_of_a_secret(gateway: GatewayProcess) -> None:
    agent = Agent()

    async def run() -> types.CallToolResult:
        async with connect(gateway, agent, "legacy") as client:
            return await client.call_tool("test_elicitation", {"message": "Please enter your Pass\u200bword"})

    result = asyncio.run(run())
    assert agent.asked == []
    assert "may not elicit secrets (password)" in text_of(result)
    record = next(r for r in audit(gateway, "test_elicitation") if "enter your" in json.dumps(r["arguments"]))
    assert record["outcome"]["relayed"][0]["decision"] == "deny"


def test_a_client_without_sampling_gets_a_tool_error_not_a_hang(gateway: GatewayProcess, tmp_path: Path) -> None:
    async def run() -> types.CallToolResult:
        http = httpx.AsyncClient(headers={"Authorization": f"Bearer {gateway.token('plain-agent', ['admins'])}"})
        async with Client(streamable_http_client(gateway.mcp_url, http_client=http), mode="legacy") as client:
            return await client.call_tool("test_sampling", {"prompt": "no sampling here"})

    result = asyncio.run(run())
    assert result.is_error


@pytest.mark.parametrize("mode", ["legacy", MODERN])
def test_the_agent_cancels_a_call_and_the_upstream_stops(gateway: GatewayProcess, mode: str, tmp_path: Path) -> None:
    marker = tmp_path / f"cancelled-{mode}"
    agent = Agent()

    def recorded() -> list[dict[str, Any]]:
        return [r for r in audit(gateway, "test_slow") if str(marker) in json.dumps(r["arguments"])]

    async def run() -> list[dict[str, Any]]:
        async with connect(gateway, agent, mode) as client:
            started = asyncio.Event()

            async def progress(done: float, total: float | None, message: str | None) -> None:
                started.set()

            call = asyncio.ensure_future(
                client.call_tool("test_slow", {"marker": str(marker)}, progress_callback=progress)
            )
            await asyncio.wait_for(started.wait(), 60)
            call.cancel()  # the client sends notifications/cancelled (2025) or closes the stream (2026)
            with pytest.raises(asyncio.CancelledError):
                await call
            # the upstream hears of it, and the gateway records the outcome, shortly after
            for _ in range(100):
                records = await asyncio.to_thread(recorded)
                if marker.exists() and records and records[0]["outcome"]:
                    return records
                await asyncio.sleep(0.2)
            return records

    records = asyncio.run(run())
    assert marker.read_text() == "cancelled"
    assert records[0]["outcome"]["cancelled"] is True
    assert "the agent cancelled the call" in records[0]["outcome"]["result_preview"]
