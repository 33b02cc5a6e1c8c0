"""Resource subscriptions through the gateway, with the official Python client in both eras and the
conformance fixture server as the upstream: a subscription is a governed act (READ on the resource,
`input.action == "subscribe"`, audited), the upstream's `notifications/resources/updated` reach the
subscribed agent (2025: on its session; 2026-07-28: on its `subscriptions/listen` stream), and an
agent without READ is refused, with an audit record, and hears nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from server.protocol.acts import DENIED
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import cli_token, run_cli
from tests.mcp_upstream import conformance_upstream

# resources/subscribe is deprecated at 2026-07-28 and served to 2025 clients on purpose
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]
WATCHED = "test://watched-resource"
SECURABLE = "main.upstream.fixture__resource__test_watched_resource"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with conformance_upstream() as url:
        env = {
            "CASTELLAN_UPSTREAMS": json.dumps([{"name": "fixture", "url": url}]),
            "CASTELLAN_SERVER__JSON_RESPONSE": "false",
        }
        with run_gateway(tmp_path_factory.mktemp("subscriptions") / "gw", env, timeout=120) as gw:
            yield gw


def audited(gateway: GatewayProcess, agent: str) -> list[dict[str, Any]]:
    found = run_cli(gateway, "audit", "search", "--agent", agent, "--format", "jsonl")
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


def client_for(gateway: GatewayProcess, http: Any, mode: str, on_message: Any = None) -> Client:
    return Client(
        streamable_http_client(gateway.mcp_url, http_client=http),  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        message_handler=on_message,
    )


async def test_a_2025_session_subscribes_hears_updates_and_unsubscribes(gateway: GatewayProcess) -> None:
    heard: list[str] = []
    arrived = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            heard.append(str(message.params.uri))
            arrived.set()

    token = cli_token(gateway, "subscriber-2025", "admins")
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        client_for(gateway, http, "legacy", on_message) as client,
    ):
        resources = client.server_capabilities.resources
        assert resources is not None
        assert resources.subscribe is True  # declared: updates are delivered
        assert isinstance(await client.subscribe_resource(WATCHED), types.EmptyResult)
        await client.call_tool("fixture.test_trigger_resource_update", {})
        with anyio.fail_after(20):
            await arrived.wait()
        assert heard == [WATCHED]
        await client.unsubscribe_resource(WATCHED)
        await client.call_tool("fixture.test_trigger_resource_update", {})
        await anyio.sleep(1)
    assert heard == [WATCHED]  # nothing after the unsubscription
    (record,) = [r for r in audited(gateway, "subscriber-2025") if r["action"] == "subscribe"]
    assert record["decision"] == "allow"
    assert record["tool"] == WATCHED
    assert record["securable"] == SECURABLE


async def test_a_2026_listen_stream_hears_the_updates_of_what_it_subscribed(gateway: GatewayProcess) -> None:
    token = cli_token(gateway, "subscriber-2026", "admins")
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        client_for(gateway, http, "2026-07-28") as client,
    ):
        async with client.listen(resource_subscriptions=[WATCHED]) as subscription:
            assert subscription.honored.resource_subscriptions == [WATCHED]
            await client.call_tool("fixture.test_trigger_resource_update", {})
            with anyio.fail_after(20):
                event = await anext(aiter(subscription))
        assert type(event).__name__ == "ResourceUpdated"
        assert event.uri == WATCHED  # type: ignore[union-attr]
    (record,) = [r for r in audited(gateway, "subscriber-2026") if r["action"] == "subscribe"]
    assert record["decision"] == "allow"


async def test_a_subscription_without_read_is_denied_with_an_audit_record(gateway: GatewayProcess) -> None:
    agent = "no-read-subscriber"
    token = cli_token(gateway, agent, "analysts")
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        async with client_for(gateway, http, "legacy") as client:
            with pytest.raises(MCPError) as refused:
                await client.subscribe_resource(WATCHED)
        async with (
            client_for(gateway, http, "2026-07-28") as client,
            client.listen(resource_subscriptions=[WATCHED], tools_list_changed=True) as subscription,
        ):
            assert not subscription.honored.resource_subscriptions  # not honored: the ack says so
            assert subscription.honored.tools_list_changed is True
    assert refused.value.code == DENIED
    body = refused.value.error.data
    assert (body["decision"], body["stage"], body["uri"]) == ("deny", "grants", WATCHED)
    assert any(f"READ on {SECURABLE}" in reason for reason in body["reasons"])
    records = [r for r in audited(gateway, agent) if r["action"] == "subscribe"]
    assert len(records) == 2  # one per era
    assert all(r["decision"] == "deny" and r["stage"] == "grants" for r in records)
    assert all(f"READ on {SECURABLE}" in r["grants_missing"] for r in records)
