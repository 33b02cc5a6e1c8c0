"""The official `mcp` Python client against the real gateway process, in both protocol eras."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.gateway_process import ANALYST_TOOLS, GatewayProcess
from tests.integration.conftest import cli_token
from tests.mcp_upstream import connect

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
ERAS = ["legacy", "2026-07-28"]


@pytest.mark.parametrize("mode", ERAS)
async def test_an_analyst_lists_only_the_tools_it_may_call(gateway: GatewayProcess, mode: str) -> None:
    token = cli_token(gateway, "analyst-bot", "analysts")
    async with connect(gateway, token, mode) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        names = sorted(t.name for t in (await client.list_tools()).tools)
    assert names == ANALYST_TOOLS


@pytest.mark.parametrize("mode", ERAS)
async def test_an_admin_sees_the_destructive_tool_too(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, "ops-bot", "admins"), mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "demo.reset" in names


@pytest.mark.parametrize("mode", ERAS)
async def test_an_allowed_call_returns_the_tool_result(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, "analyst-bot", "analysts"), mode) as client:
        result = await client.call_tool("echo", {"text": f"hello {mode}"})
    assert not result.is_error
    assert result.structured_content == {"text": f"hello {mode}"}


@pytest.mark.parametrize("mode", ERAS)
async def test_a_forbidden_call_is_an_error_result_with_reasons(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, "analyst-bot", "analysts"), mode) as client:
        result = await client.call_tool("demo.reset", {})
    assert result.is_error
    assert result.structured_content == {
        "decision": "deny",
        "stage": "grants",
        "code": "denied",
        "reasons": ["missing privilege USE SCHEMA on main.admin", "missing privilege EXECUTE on main.admin.reset_demo"],
    }
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_policy_denial_names_the_rule(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, "analyst-bot", "analysts"), mode) as client:
        result = await client.call_tool("echo", {"text": "x" * 500})
    assert result.is_error
    body = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert (body["decision"], body["stage"]) == ("deny", "policy")
    assert body["reasons"] == ["argument text must be a string of at most 200 characters"]
    # echo declares an output schema, so the denial is not dressed up as echo's structured output
    assert result.structured_content is None


@pytest.mark.parametrize("mode", ERAS)
async def test_policy_obligations_redact_the_result(gateway: GatewayProcess, mode: str) -> None:
    async with connect(gateway, cli_token(gateway, "analyst-bot", "analysts"), mode) as client:
        result = await client.call_tool("demo.profile", {"customer_id": "c-002"})
    assert not result.is_error
    assert result.structured_content == {"id": "c-002", "name": "Alan Turing", "email": "[REDACTED]", "tier": "silver"}


async def test_every_call_is_in_the_audit_outbox_under_the_agents_identity(gateway: GatewayProcess) -> None:
    async with connect(gateway, cli_token(gateway, "auditee-bot", "analysts"), "2026-07-28") as client:
        ok = await client.call_tool("echo", {"text": "audited"}, meta={"run_id": "audit-run-1"})
        denied = await client.call_tool("demo.reset", {}, meta={"run_id": "audit-run-1"})
    assert not ok.is_error
    assert denied.is_error
    conn = sqlite3.connect(gateway.data_dir / "audit.db")
    rows = conn.execute("SELECT kind, record FROM outbox ORDER BY seq").fetchall()
    mine = [
        (kind, json.loads(r))
        for kind, r in rows
        if json.loads(r).get("agent_id") == "auditee-bot"
        or (kind == "outcome" and "audited" in (json.loads(r).get("result_preview") or ""))
    ]
    decisions = [r for kind, r in mine if kind == "decision"]
    assert [(d["tool"], d["decision"], d["run_id"]) for d in decisions] == [
        ("echo", "allow", "audit-run-1"),
        ("demo.reset", "deny", "audit-run-1"),
    ]
    assert decisions[0]["arguments"] == {"text": "audited"}
    assert decisions[0]["policy_version"]
    outcome = next(r for kind, r in mine if kind == "outcome")
    assert outcome["call_id"] == decisions[0]["call_id"]
    # the preview covers every kind of content the tool returned: its text, then its structured content
    assert outcome["result_preview"] == 'audited\n{"text": "audited"}'
    assert set(outcome["timings_ms"]) >= {"authenticate", "admit", "grants", "policy", "record", "invoke"}
