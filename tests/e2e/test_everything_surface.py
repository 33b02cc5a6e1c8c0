"""server-everything (the MCP reference server) as an upstream behind the gateway: its resources,
templates, prompts and completions driven through Castellan, governed and audited, with the official
Python client in both protocol eras and with the TypeScript SDK clients v1 and v2."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from server.protocol.acts import DENIED
from tests.e2e.conftest import E2E, run_node
from tests.everything_server import run_everything
from tests.gateway_process import GatewayProcess, run_cli, run_gateway
from tests.mcp_upstream import connect

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
ERAS = ["legacy", "2026-07-28"]
DOC = "demo://resource/static/document/architecture.md"
FEATURES = "demo://resource/static/document/features.md"
SCHEMA = "main.upstream"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The gateway with server-everything as upstream `everything`; analysts may read one document only."""
    with run_everything() as everything:
        env = {"CASTELLAN_UPSTREAMS": json.dumps([{"name": "everything", "url": everything.url}])}
        with run_gateway(tmp_path_factory.mktemp("everything") / "gw", env, timeout=120) as gw:
            doc = f"{SCHEMA}.everything__resource__demo_resource_static_document_architecture_md"
            for statement in (f"USE SCHEMA ON SCHEMA {SCHEMA}", f"READ ON RESOURCE {doc}"):
                done = cli(gw, "grants", "grant", *statement.split(), "TO", "analysts")
                assert done.returncode == 0, done.stderr
            yield gw


def cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(gateway, *args, timeout=60)


def audited(gateway: GatewayProcess, agent: str) -> list[dict[str, Any]]:
    found = cli(gateway, "audit", "search", "--agent", agent, "--format", "jsonl")
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


@pytest.mark.parametrize("mode", ERAS)
async def test_the_python_client_reads_gets_and_completes_through_the_gateway(
    gateway: GatewayProcess, mode: str
) -> None:
    agent = f"everything-py-{mode}"
    async with connect(gateway, gateway.token(agent, ["admins"]), mode) as client:
        listed = {str(r.uri): r.name for r in (await client.list_resources()).resources}
        assert listed[DOC] == "everything.architecture.md"
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert "demo://resource/dynamic/text/{resourceId}" in templates
        doc = await client.read_resource(DOC)
        assert doc.contents[0].mime_type == "text/markdown"
        text = await client.read_resource("demo://resource/dynamic/text/7")
        assert "7" in text.contents[0].text  # type: ignore[union-attr]
        blob = await client.read_resource("demo://resource/dynamic/blob/3")
        assert blob.contents[0].blob  # type: ignore[union-attr]

        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert {"everything.simple-prompt", "everything.args-prompt", "everything.completable-prompt"} <= prompts
        got = await client.get_prompt("everything.args-prompt", {"city": "Lisbon"})
        assert "Lisbon" in got.messages[0].content.text  # type: ignore[union-attr]

        ref = types.PromptReference(type="ref/prompt", name="everything.completable-prompt")
        assert (await client.complete(ref, {"name": "department", "value": "E"})).completion.values == ["Engineering"]
        led = await client.complete(ref, {"name": "name", "value": ""}, {"department": "Sales"})
        assert led.completion.values == ["David", "Eve", "Frank"]
    acts = {(r["action"], r["decision"]) for r in audited(gateway, agent)}
    assert {("read", "allow"), ("prompt", "allow"), ("complete", "allow")} <= acts


@pytest.mark.parametrize("mode", ERAS)
async def test_a_read_without_read_is_denied_with_reasons_and_audited(gateway: GatewayProcess, mode: str) -> None:
    agent = f"everything-analyst-{mode}"
    async with connect(gateway, gateway.token(agent, ["analysts"]), mode) as client:
        upstreams = [
            str(r.uri) for r in (await client.list_resources()).resources if not str(r.uri).startswith("castellan:")
        ]
        assert upstreams == [DOC]  # what it may read of the upstream's
        assert (await client.read_resource(DOC)).contents
        with pytest.raises(MCPError) as refused:
            await client.read_resource(FEATURES)
    assert refused.value.code == DENIED
    body = refused.value.error.data
    assert body["stage"] == "grants"
    assert body["reasons"] == [
        f"missing privilege READ on {SCHEMA}.everything__resource__demo_resource_static_document_features_md"
    ]
    reads = {r["tool"]: r for r in audited(gateway, agent) if r["action"] == "read"}
    assert reads[DOC]["decision"] == "allow"
    assert reads[FEATURES]["decision"] == "deny"
    assert reads[FEATURES]["reasons"] == body["reasons"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_typescript_sdk_reads_gets_and_completes_through_the_gateway(
    node: Path, tmp_path: Path, gateway: GatewayProcess, version: str
) -> None:
    token = gateway.token(f"everything-ts-{version}", ["admins"])
    run = run_node(node, E2E / "clients" / "ts_surface.mjs", [version, gateway.mcp_url, token], home=tmp_path)
    assert run.code == 0, run.stderr
    result: Any = json.loads(run.stdout.strip().splitlines()[-1])
    assert DOC in result["resources"]
    assert "demo://resource/dynamic/blob/{resourceId}" in result["templates"]
    assert result["read"]["contents"][0]["uri"] == DOC
    assert "7" in result["templated"]["contents"][0]["text"]
    assert "everything.resource-prompt" in result["prompts"]
    assert "Lisbon" in result["prompt"]["messages"][0]["content"]["text"]
    assert result["completion"]["completion"]["values"] == ["Engineering"]
    assert result["refused"] is None  # admins read everything


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_typescript_sdk_sees_a_read_refused(
    node: Path, tmp_path: Path, gateway: GatewayProcess, version: str
) -> None:
    token = gateway.token(f"everything-ts-analyst-{version}", ["analysts"])
    args = [version, gateway.mcp_url, token, "--lists-only"]
    run = run_node(node, E2E / "clients" / "ts_surface.mjs", args, home=tmp_path)
    assert run.code == 0, run.stderr
    result: Any = json.loads(run.stdout.strip().splitlines()[-1])
    assert [uri for uri in result["resources"] if not uri.startswith("castellan:")] == [DOC]  # the upstream's
    assert result["refused"]["code"] == DENIED
    assert result["refused"]["data"]["stage"] == "grants"
