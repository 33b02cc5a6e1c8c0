"""Input rounds outside `tools/call`: an upstream that asks the agent's user something while it builds a
prompt (`prompts/get`) or reads a resource (`resources/read`) is relayed through Castellan like a tool's
request, in both eras (2025: a server-to-client request on the act's stream; 2026-07-28: an
`input_required` result with sealed state, resumed by the agent's retry), each request decided by
policy and recorded as a span of the act. Real processes: the gateway and the conformance fixture
upstream; the agent is the official Python client, which answers the rounds with its callbacks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
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
ERAS = ["legacy", "2026-07-28"]
PROMPT = "test_input_required_result_prompt"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("relay-acts")
    policies = policies_with_upstreams(root, {"noelicit": {"forbid": ["elicit"]}})
    with conformance_upstream() as url:
        # the same server twice: as `fixture`, and as `noelicit`, which policy forbids to elicit (its URIs
        # collide with fixture's, so only its prompts are served)
        upstreams = [
            {"name": "fixture", "url": url, "prefix": ""},
            {"name": "noelicit", "url": url, "prefix": "noelicit."},
        ]
        env = {"CASTELLAN_UPSTREAMS": json.dumps(upstreams), "CASTELLAN_POLICY__PATH": str(policies)}
        with run_gateway(root / "gw", env, timeout=120) as gw:
            yield gw


class User:
    def __init__(self, context: str) -> None:
        self.context = context
        self.asked: list[str] = []

    async def elicitation(self, ctx: Any, params: Any) -> types.ElicitResult:
        self.asked.append(params.message)
        return types.ElicitResult(action="accept", content={"context": self.context})


def connect(gw: GatewayProcess, user: User, mode: str, agent: str) -> Client:
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {gw.token(agent, ['admins'])}"})
    return Client(
        streamable_http_client(gw.mcp_url, http_client=http),
        mode=mode,  # type: ignore[arg-type]
        elicitation_callback=user.elicitation,
    )


def audit(gw: GatewayProcess, agent: str) -> list[dict[str, Any]]:
    return settled_audit(gw, "--agent", agent)  # the outcomes are group-committed after the response


@pytest.mark.parametrize("mode", ERAS)
def test_a_prompt_that_asks_the_user_is_relayed_and_audited(gateway: GatewayProcess, mode: str) -> None:
    user, agent = User(f"quarterly numbers ({mode})"), f"prompt-asker-{mode}"

    async def run() -> types.GetPromptResult:
        async with connect(gateway, user, mode, agent) as client:
            return await client.get_prompt(PROMPT)

    got = asyncio.run(run())
    assert user.asked == ["What context should the prompt use?"]
    assert got.messages[0].content.text == f"Use this context: quarterly numbers ({mode})"  # type: ignore[union-attr]
    (record,) = [r for r in audit(gateway, agent) if r["action"] == "prompt"]
    assert record["decision"] == "allow"
    [span] = record["outcome"]["relayed"]
    assert (span["action"], span["decision"], span["outcome"]) == ("elicit", "allow", "answered")
    assert span["upstream"] == "fixture"


@pytest.mark.parametrize("mode", ERAS)
def test_a_resource_read_that_asks_the_user_is_relayed(gateway: GatewayProcess, mode: str) -> None:
    user, agent = User(f"for the audit ({mode})"), f"resource-asker-{mode}"

    async def run() -> types.ReadResourceResult:
        async with connect(gateway, user, mode, agent) as client:
            return await client.read_resource("test://asking-resource", cache_mode="bypass")

    read = asyncio.run(run())
    assert read.contents[0].text == f"Read with context: for the audit ({mode})"  # type: ignore[union-attr]
    (record,) = [r for r in audit(gateway, agent) if r["action"] == "read"]
    assert record["outcome"]["relayed"][0]["action"] == "elicit"


@pytest.mark.parametrize("mode", ERAS)
def test_policy_forbids_an_upstream_to_elicit_during_a_prompt(gateway: GatewayProcess, mode: str) -> None:
    user, agent = User("never asked"), f"forbidden-asker-{mode}"

    async def run() -> MCPError:
        async with connect(gateway, user, mode, agent) as client:
            with pytest.raises(MCPError) as refused:
                await client.get_prompt(f"noelicit.{PROMPT}")
            return refused.value

    refused = asyncio.run(run())
    assert "upstream noelicit may not elicit through the agent" in refused.error.message
    assert user.asked == []  # the request never reached the user
    (record,) = [r for r in audit(gateway, agent) if r["action"] == "prompt"]
    [span] = record["outcome"]["relayed"]
    assert (span["action"], span["decision"], span["stage"]) == ("elicit", "deny", "policy")
    assert span["upstream"] == "noelicit"


def test_a_state_sealed_for_one_prompt_does_not_resume_another_request(gateway: GatewayProcess) -> None:
    user = User("x")

    async def run() -> None:
        async with connect(gateway, user, "2026-07-28", "state-mover") as client:
            first = await client.session.get_prompt(PROMPT, None, allow_input_required=True)
            assert isinstance(first, types.InputRequiredResult)
            assert first.request_state
            with pytest.raises(MCPError) as moved:  # the same state on a read: bound to prompts/get
                await client.session.read_resource(
                    "test://asking-resource", request_state=first.request_state, input_responses={},
                    allow_input_required=True,
                )  # fmt: skip
            assert moved.value.error.code == types.INVALID_PARAMS

    asyncio.run(run())
