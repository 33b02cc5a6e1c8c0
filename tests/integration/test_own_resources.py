"""Castellan's own resources through a real gateway (demo data), with the official Python client in both
eras: each Delta table's schema and sample, and the documents of the search index, listed per identity
(READ on each one's RESOURCE securable, as the demo grants it), read through the read pipeline
(redacted by the policy's obligations like a tool result), every read audited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from server.protocol.acts import DENIED
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import cli_token, run_cli
from tests.mcp_upstream import connect

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ERAS = ["legacy", "2026-07-28"]
ORDERS, CUSTOMERS = "castellan://tables/main.sales.orders", "castellan://tables/main.sales.customers"
DOCS = "castellan://docs/{doc_id}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with run_gateway(tmp_path_factory.mktemp("own-resources") / "gw", {}, timeout=120) as gw:
        yield gw


def reads(gateway: GatewayProcess, agent: str) -> list[dict[str, Any]]:
    found = run_cli(gateway, "audit", "search", "--agent", agent, "--format", "jsonl")
    assert found.returncode == 0, found.stderr
    return [r for r in map(json.loads, found.stdout.splitlines()) if r["action"] == "read"]


@pytest.mark.parametrize("mode", ERAS)
async def test_an_analyst_sees_and_reads_only_what_it_is_granted(gateway: GatewayProcess, mode: str) -> None:
    agent = f"own-analyst-{mode}"
    async with connect(gateway, cli_token(gateway, agent, "analysts"), mode) as client:
        listed = {str(r.uri): r.name for r in (await client.list_resources()).resources}
        assert listed == {  # not the customers table
            ORDERS: "castellan.table.main.sales.orders",
            "castellan://tables/main.support.docs": "castellan.table.main.support.docs",
        }
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        assert templates == [DOCS]
        orders = json.loads((await client.read_resource(ORDERS)).contents[0].text)  # type: ignore[union-attr]
        assert orders["table"] == "main.sales.orders"
        assert {c["name"] for c in orders["columns"]} >= {"order_id", "customer_id"}
        assert 0 < len(orders["sample"]) <= 5
        doc = (await client.read_resource("castellan://docs/kb-002")).contents[0]
        assert doc.mime_type == "text/markdown"
        assert doc.text.startswith("# Refund policy")  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await client.read_resource(CUSTOMERS)
        with pytest.raises(MCPError) as missing:
            await client.read_resource("castellan://docs/kb-999")
    assert refused.value.code == DENIED
    assert refused.value.error.data["stage"] == "grants"
    assert "missing privilege READ on main.sales.customers__resource" in refused.value.error.data["reasons"]
    assert missing.value.code == -32602
    decided = {(r["tool"], r["decision"]) for r in reads(gateway, agent)}
    assert {(ORDERS, "allow"), ("castellan://docs/kb-002", "allow"), (CUSTOMERS, "deny")} <= decided


async def test_a_sample_is_redacted_like_a_tool_result(gateway: GatewayProcess) -> None:
    async with connect(gateway, cli_token(gateway, "own-admin", "admins"), "2026-07-28") as client:
        listed = {str(r.uri) for r in (await client.list_resources()).resources}
        assert {ORDERS, CUSTOMERS} <= listed
        read = await client.read_resource(CUSTOMERS)
    body = json.loads(read.contents[0].text)  # type: ignore[union-attr]
    assert body["sample"]
    assert all("@" not in str(row["email"]) for row in body["sample"])
    assert "contact1@example.com" not in read.contents[0].text  # type: ignore[union-attr]
