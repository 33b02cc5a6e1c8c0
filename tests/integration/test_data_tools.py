"""The data tools through a running gateway: governed SQL over the demo Delta tables, document search
that follows its Delta table incrementally, and catalog functions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import deny_body, raw_call, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
JOIN = (
    "SELECT c.name, SUM(o.amount) AS total FROM main.sales.orders o "
    "JOIN main.sales.customers c USING (customer_id) GROUP BY c.name ORDER BY total DESC LIMIT 3"
)


async def invalidate_grants(gw: GatewayProcess) -> None:
    admin = gw.token("admin-bot", scopes=["castellan:admin"])
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.base_url}/admin/grants/invalidate", headers={"authorization": f"Bearer {admin}"}) as resp,
    ):
        assert resp.status == 200


async def test_sql_reads_what_the_grants_allow_and_refuses_anything_else(gateway: GatewayProcess) -> None:
    token = gateway.token("sql-analyst", ["analysts", "account-managers"])
    result = await raw_call(
        gateway,
        token,
        "sql.query",
        {"query": "SELECT region, COUNT(*) AS n FROM main.sales.orders GROUP BY region ORDER BY region"},
    )
    assert result.get("isError") is not True, result
    table = result["structuredContent"]
    assert [c["name"] for c in table["columns"]] == ["region", "n"]
    assert table["rows"] == [["AMER", 20], ["APAC", 20], ["EMEA", 20]]

    denied = deny_body(await raw_call(gateway, token, "sql.query", {"query": JOIN}))
    assert denied["stage"] == "grants"
    assert denied["reasons"] == ["missing privilege SELECT on main.sales.customers"]

    done = run_cli(
        gateway, "grants", "grant", "--kind", "group", "SELECT", "ON", "TABLE", "main.sales.customers", "TO",
        "account-managers",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    await invalidate_grants(gateway)
    joined = await raw_call(gateway, token, "sql.query", {"query": JOIN})
    assert joined.get("isError") is not True, joined
    assert len(joined["structuredContent"]["rows"]) == 3

    refused = deny_body(await raw_call(gateway, token, "sql.query", {"query": "DROP TABLE main.sales.orders"}))
    assert refused["stage"] == "validate"  # after the function grants, before the table grants
    assert refused["reasons"] == ["query refused: only queries (SELECT) are allowed, not DROP"]
    sneaky = "SELECT * FROM main.sales.orders; DELETE FROM main.sales.orders"
    assert (
        "exactly one statement"
        in deny_body(await raw_call(gateway, token, "sql.query", {"query": sneaky}))["reasons"][0]
    )


async def test_catalog_functions_are_tools(gateway: GatewayProcess) -> None:
    token = gateway.token("fn-analyst", ["analysts"])
    result = await raw_call(gateway, token, "main.tools.apply_discount", {"price": 4800.0, "percent": 15})
    assert result["structuredContent"] == {"result": 4080.0}
    outsider = gateway.token("fn-outsider", [])
    body = deny_body(await raw_call(gateway, outsider, "main.tools.apply_discount", {"price": 1.0}))
    assert "missing privilege EXECUTE on main.tools.apply_discount" in body["reasons"]


async def test_document_search_follows_new_delta_versions_without_a_rebuild(tmp_path: Path) -> None:
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    with run_gateway(tmp_path / "gw") as gw:
        token = gw.token("support-bot", ["analysts"])
        first = (await raw_call(gw, token, "docs.search", {"query": "refund annual subscription"}))["structuredContent"]
        assert first["hits"][0]["doc_id"] == "kb-002"
        assert first["version"] == 0

        docs = str(tmp_path / "gw" / "delta" / "main" / "support" / "docs")
        new = {
            "doc_id": ["kb-007"],
            "title": ["Two-factor authentication"],
            "body": ["Turn on 2FA with an authenticator app."],
        }
        write_deltalake(docs, pa.table(new), mode="append")  # version 1
        DeltaTable(docs).delete("doc_id = 'kb-002'")  # version 2
        await asyncio.sleep(2.1)  # the tool checks the table's version at most every 2 s

        found = (await raw_call(gw, token, "docs.search", {"query": "authenticator"}))["structuredContent"]
        assert [h["doc_id"] for h in found["hits"]] == ["kb-007"]
        assert found["version"] == 2
        gone = (await raw_call(gw, token, "docs.search", {"query": "refund annual subscription"}))["structuredContent"]
        assert "kb-002" not in [h["doc_id"] for h in gone["hits"]]
        vector = await raw_call(
            gw, token, "docs.search", {"query": "two factor authenticator", "mode": "vector", "limit": 1}
        )
        assert vector["structuredContent"]["hits"][0]["doc_id"] == "kb-007"
        log = gw.log()
    assert log.count('"doc_index_built"') == 1  # the first sync only
    assert '"doc_index_synced"' in log
    assert '"upserted": 1' in log
    assert '"deleted": 1' in log
