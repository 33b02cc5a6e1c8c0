"""Resources, prompts and completions of an upstream MCP server through the gateway, with the official
Python client in both eras: listed per identity, a read only with READ on the resource's securable, a
prompt only with EXECUTE on its function and arguments decided like a tool call's, every act audited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from server.protocol.acts import DENIED
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import cli_token, run_cli
from tests.mcp_upstream import conformance_upstream, connect

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ERAS = ["legacy", "2026-07-28"]
TEXT = "main.upstream.fixture__resource__test_static_text"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The gateway with the conformance fixture server (resources, a template) as upstream `fixture`."""
    with conformance_upstream() as url:
        env = {
            "CASTELLAN_UPSTREAMS": json.dumps([{"name": "fixture", "url": url}]),
            # responses as SSE streams, so a request's log notifications can ride them (JSON responses
            # carry none: the relay routes a request that asks for them to the SSE path)
            "CASTELLAN_SERVER__JSON_RESPONSE": "false",
            "CASTELLAN_TOOLS__UPSTREAM_REFRESH_SECONDS": "0.3",  # list changes seen quickly
        }
        with run_gateway(tmp_path_factory.mktemp("resources") / "gw", env, timeout=120) as gw:
            yield gw


async def discover(gateway: GatewayProcess, token: str) -> dict[str, object]:
    """The capabilities a 2026-07-28 `server/discover` declares."""
    import aiohttp

    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}
    headers = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "server/discover",
    }
    async with aiohttp.ClientSession() as s, s.post(gateway.mcp_url, json=body, headers=headers) as resp:
        capabilities = (await resp.json())["result"]["capabilities"]
    assert isinstance(capabilities, dict)
    return capabilities


def audited(gateway: GatewayProcess, agent: str) -> list[dict[str, object]]:
    found = run_cli(gateway, "audit", "search", "--agent", agent, "--format", "jsonl")
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


@pytest.mark.parametrize("mode", ERAS)
async def test_an_admin_lists_and_reads_the_upstreams_resources(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, f"reader-{mode}", "admins"), mode) as client:
        if mode == "legacy":
            assert client.server_capabilities.resources is not None
        else:
            assert "resources" in (await discover(gateway, cli_token(gateway, "discoverer", "admins")))
        listed = await client.list_resources()
        by_uri = {str(r.uri): r for r in listed.resources}
        assert {"test://static-text", "test://static-binary", "test://watched-resource"} <= set(by_uri)
        assert by_uri["test://static-text"].name == "fixture.static-text"  # namespaced like its tools
        templates = await client.list_resource_templates()
        upstream_templates = [
            t.uri_template for t in templates.resource_templates if t.uri_template.startswith("test:")
        ]
        assert upstream_templates == ["test://template/{id}/data"]

        text = await client.read_resource("test://static-text")
        assert text.contents[0].text == "This is the content of the static text resource."  # type: ignore[union-attr]
        binary = await client.read_resource("test://static-binary")
        assert binary.contents[0].mime_type == "image/png"
        assert binary.contents[0].blob
        templated = await client.read_resource("test://template/123/data")
        assert json.loads(templated.contents[0].text)["id"] == "123"  # type: ignore[union-attr]

    records = audited(gateway, f"reader-{mode}")
    reads = [r for r in records if r["action"] == "read"]
    assert {r["tool"] for r in reads} == {"test://static-text", "test://static-binary", "test://template/123/data"}
    assert all(r["decision"] == "allow" for r in reads)
    assert {r["securable"] for r in reads if r["tool"] == "test://static-text"} == {TEXT}


@pytest.mark.parametrize("mode", ERAS)
async def test_a_read_without_read_is_denied_clearly_and_audited(gateway: GatewayProcess, mode: str) -> None:
    agent = f"no-read-{mode}"
    async with connect(gateway, cli_token(gateway, agent, "analysts"), mode) as client:
        listed = (await client.list_resources()).resources
        assert [r for r in listed if str(r.uri).startswith("test://")] == []  # none of the upstream's it may not read
        with pytest.raises(MCPError) as refused:
            await client.read_resource("test://static-text")
    assert refused.value.code == DENIED
    body = refused.value.error.data
    assert body["decision"] == "deny"
    assert body["stage"] == "grants"
    assert body["uri"] == "test://static-text"
    assert any(f"READ on {TEXT}" in reason for reason in body["reasons"])
    (record,) = [r for r in audited(gateway, agent) if r["action"] == "read"]
    assert record["decision"] == "deny"
    assert record["stage"] == "grants"
    assert f"READ on {TEXT}" in record["grants_missing"]


async def test_a_grant_of_read_lets_an_analyst_read_that_resource_only(gateway: GatewayProcess) -> None:
    done = run_cli(gateway, "grants", "grant", "READ", "ON", "RESOURCE", TEXT, "TO", "analysts")
    assert done.returncode == 0, done.stderr
    done = run_cli(gateway, "grants", "grant", "USE", "SCHEMA", "ON", "SCHEMA", "main.upstream", "TO", "analysts")
    assert done.returncode == 0, done.stderr
    async with connect(gateway, cli_token(gateway, "granted-reader", "analysts"), "2026-07-28") as client:
        listed = await client.list_resources(cache_mode="bypass")
        assert [str(r.uri) for r in listed.resources if str(r.uri).startswith("test://")] == ["test://static-text"]
        read = await client.read_resource("test://static-text", cache_mode="bypass")
        assert "static text resource" in read.contents[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await client.read_resource("test://static-binary", cache_mode="bypass")
        assert refused.value.code == DENIED


@pytest.mark.parametrize("mode", ERAS)
async def test_an_unknown_uri_is_invalid_params_naming_it(gateway: GatewayProcess, mode: str) -> None:
    agent = f"lost-{mode}"
    async with connect(gateway, cli_token(gateway, agent, "admins"), mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.read_resource("test://nonexistent")
        with pytest.raises(MCPError) as under_template:  # matches the template; the upstream says not found
            await client.read_resource("test://template/1/2/data")
    assert refused.value.code == -32602
    assert refused.value.error.data["uri"] == "test://nonexistent"
    assert under_template.value.code == -32602
    decisions = {r["tool"]: r["decision"] for r in audited(gateway, agent) if r["action"] == "read"}
    assert decisions["test://nonexistent"] == "deny"


def test_resource_securables_are_in_the_catalog(gateway: GatewayProcess, tmp_path: Path) -> None:
    shown = run_cli(gateway, "grants", "show", "--securable", TEXT)
    assert shown.returncode == 0, shown.stderr


PROMPT = "main.upstream.fixture__prompt__test_prompt_with_arguments"


@pytest.mark.parametrize("mode", ERAS)
async def test_an_admin_lists_and_gets_prompts_with_arguments_and_images(gateway: GatewayProcess, mode: str) -> None:
    agent = f"prompter-{mode}"
    async with connect(gateway, cli_token(gateway, agent, "admins"), mode) as client:
        listed = {p.name: p for p in (await client.list_prompts()).prompts}
        assert "fixture.test_prompt_with_arguments" in listed
        assert [a.name for a in listed["fixture.test_prompt_with_arguments"].arguments or []] == ["arg1", "arg2"]
        got = await client.get_prompt("fixture.test_prompt_with_arguments", {"arg1": "hello", "arg2": "world"})
        assert got.messages[0].content.text == "Prompt with arguments: arg1='hello', arg2='world'"  # type: ignore[union-attr]
        image = await client.get_prompt("fixture.test_prompt_with_image")
        assert image.messages[0].role == "user"
        assert image.messages[0].content.type == "image"
        with pytest.raises(MCPError) as missing:  # arg2 is required: refused before policy, audited
            await client.get_prompt("fixture.test_prompt_with_arguments", {"arg1": "hello"})
        assert missing.value.error.data["stage"] == "validate"
    records = [r for r in audited(gateway, agent) if r["action"] == "prompt"]
    assert {(r["tool"], r["decision"]) for r in records} >= {
        ("fixture.test_prompt_with_arguments", "allow"),
        ("fixture.test_prompt_with_image", "allow"),
        ("fixture.test_prompt_with_arguments", "deny"),
    }
    allowed = next(r for r in records if r["decision"] == "allow" and r["tool"].endswith("arguments"))
    assert allowed["arguments"] == {"arg1": "hello", "arg2": "world"}
    assert allowed["securable"] == PROMPT


@pytest.mark.parametrize("mode", ERAS)
async def test_prompt_arguments_meet_the_policy_a_tool_call_meets(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, f"sneaky-{mode}", "admins"), mode) as client:
        with pytest.raises(MCPError) as refused:  # a zero-width space and full-width letters hide nothing
            await client.get_prompt(
                "fixture.test_prompt_with_arguments",
                {"arg1": "drop\u200b \uff34\uff21\uff22\uff2c\uff25 x", "arg2": "y"},
            )
    assert refused.value.code == DENIED
    assert refused.value.error.data["stage"] == "policy"
    assert refused.value.error.data["reasons"] == ['argument arg1 contains blocked text "drop table"']


@pytest.mark.parametrize("mode", ERAS)
async def test_an_analyst_without_execute_sees_no_prompts_and_gets_none(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, f"no-prompt-{mode}", "analysts"), mode) as client:
        assert (await client.list_prompts()).prompts == []
        with pytest.raises(MCPError) as refused:
            await client.get_prompt("fixture.test_simple_prompt")
    assert refused.value.code == DENIED
    assert refused.value.error.data["stage"] == "grants"


@pytest.mark.parametrize("mode", ERAS)
async def test_completions_come_from_the_upstream_governed_and_audited(gateway: GatewayProcess, mode: str) -> None:
    import mcp_types as types

    agent = f"completer-{mode}"
    async with connect(gateway, cli_token(gateway, agent, "admins"), mode) as client:
        ref = types.PromptReference(type="ref/prompt", name="fixture.test_prompt_with_arguments")
        done = await client.complete(ref, {"name": "arg1", "value": "par"})
        assert done.completion.values == ["paris", "park", "party"]
        template = types.ResourceTemplateReference(type="ref/resource", uri="test://template/{id}/data")
        assert (await client.complete(template, {"name": "id", "value": "test"})).completion.values
        with pytest.raises(MCPError) as unknown:
            await client.complete(types.PromptReference(type="ref/prompt", name="nothing"), {"name": "a", "value": ""})
        assert unknown.value.code == -32602
    async with connect(gateway, cli_token(gateway, f"no-complete-{mode}", "analysts"), mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.complete(ref, {"name": "arg1", "value": "par"})
        assert refused.value.code == DENIED
    records = [r for r in audited(gateway, agent) if r["action"] == "complete"]
    assert {r["decision"] for r in records} == {"allow", "deny"}
    assert any(r["arguments"] == {"arg1": "par"} for r in records)


@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_that_asks_is_told_what_the_gateway_decided(gateway: GatewayProcess, mode: str) -> None:
    import warnings

    heard: list[Any] = []

    async def on_log(params: Any) -> None:
        heard.append(params)

    token = cli_token(gateway, f"listener-{mode}", "analysts")
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(
            streamable_http_client(gateway.mcp_url, http_client=http),  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            logging_callback=on_log,
            log_level="info" if mode != "legacy" else None,  # 2026-07-28: a per-request opt-in
        )
        async with client:
            if mode == "legacy":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await client.set_logging_level("info")
            await client.call_tool("echo", {"text": "hello"})
            with pytest.raises(MCPError):
                await client.read_resource("test://static-binary")
    decisions = [p.data for p in heard if p.logger == "castellan"]
    assert [(d["action"], d["decision"]) for d in decisions] == [("call", "allow"), ("read", "deny")]
    assert decisions[1]["stage"] == "grants"
    assert [p.level for p in heard if p.logger == "castellan"] == ["info", "warning"]


async def test_a_client_that_does_not_ask_hears_nothing(gateway: GatewayProcess) -> None:
    heard: list[Any] = []

    async def on_log(params: Any) -> None:
        heard.append(params)

    token = cli_token(gateway, "quiet", "analysts")
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(
            streamable_http_client(gateway.mcp_url, http_client=http),  # type: ignore[arg-type]
            mode="legacy",
            logging_callback=on_log,
        )
        async with client:
            await client.call_tool("echo", {"text": "hello"})
    assert heard == []


@pytest.mark.parametrize("mode", ERAS)
async def test_an_agent_hears_of_a_tool_an_upstream_adds_without_reconnecting(
    gateway: GatewayProcess, mode: str
) -> None:
    import anyio
    import mcp_types as types

    heard = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            heard.set()

    token = cli_token(gateway, f"watcher-{mode}", "admins")
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(
            streamable_http_client(gateway.mcp_url, http_client=http),  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            message_handler=on_message,
        )
        async with client:
            before = {t.name for t in (await client.list_tools()).tools}
            if mode == "legacy":  # the session's standalone stream carries it
                await client.call_tool("fixture.test_trigger_tool_change", {})
                with anyio.fail_after(20):
                    await heard.wait()
            else:
                async with client.listen(tools_list_changed=True) as subscription:
                    await client.call_tool("fixture.test_trigger_tool_change", {})
                    with anyio.fail_after(20):
                        event = await anext(aiter(subscription))
                assert type(event).__name__ == "ToolsListChanged"
            after = {t.name for t in (await client.list_tools(cache_mode="bypass")).tools}
    assert len(after - before) == 1
    assert next(iter(after - before)).startswith("fixture.test_added_tool_")


BINARY = "main.upstream.fixture__resource__test_static_binary"


@pytest.mark.parametrize("mode", ERAS)
async def test_an_agent_hears_of_a_grant_and_a_revoke_made_with_the_cli_without_reconnecting(
    gateway: GatewayProcess, mode: str
) -> None:
    """`castellan grants` writes the catalog from another process; the gateway notices the commit, drops its
    grant cache and tells connected agents their lists changed: the next listing shows the new view."""
    import anyio
    import mcp_types as types

    heard: list[str] = []
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceListChangedNotification):
            heard.append(mode)
            changed.set()

    def binary_listed(listed: types.ListResourcesResult) -> bool:
        return "test://static-binary" in {str(r.uri) for r in listed.resources}

    async def cli_then_hear(client: Client, *args: str) -> None:
        nonlocal changed
        changed = anyio.Event()
        if mode == "legacy":  # the session's standalone stream carries it
            assert run_cli(gateway, "grants", *args).returncode == 0
            with anyio.fail_after(30):
                await changed.wait()
        else:
            async with client.listen(resources_list_changed=True) as subscription:
                assert run_cli(gateway, "grants", *args).returncode == 0
                with anyio.fail_after(30):
                    event = await anext(aiter(subscription))
            assert type(event).__name__ == "ResourcesListChanged"

    schema = ("grant", "USE", "SCHEMA", "ON", "SCHEMA", "main.upstream", "TO", "analysts")
    assert run_cli(gateway, "grants", *schema).returncode == 0
    token = cli_token(gateway, f"grant-watcher-{mode}", "analysts")
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        client = Client(
            streamable_http_client(gateway.mcp_url, http_client=http),  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            message_handler=on_message,
        )
        async with client:
            assert not binary_listed(await client.list_resources(cache_mode="bypass"))
            await cli_then_hear(client, "grant", "READ", "ON", "RESOURCE", BINARY, "TO", "analysts")
            assert binary_listed(await client.list_resources(cache_mode="bypass"))  # at once: the cache was dropped
            await cli_then_hear(client, "revoke", "READ", "ON", "RESOURCE", BINARY, "FROM", "analysts")
            assert not binary_listed(await client.list_resources(cache_mode="bypass"))
            with pytest.raises(MCPError) as refused:  # the revoke holds from the next act
                await client.read_resource("test://static-binary", cache_mode="bypass")
            assert refused.value.code == DENIED
