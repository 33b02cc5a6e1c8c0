"""The MCP Inspector CLI (`@modelcontextprotocol/inspector --cli`) against the real gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E, Run, run_node
from tests.gateway_process import ANALYST_TOOLS, GatewayProcess

pytestmark = pytest.mark.e2e
INSPECTOR = E2E / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"


def inspector(node: Path, tmp_path: Path, gateway: GatewayProcess, token: str | None, *args: str) -> Run:
    headers = ["--header", f"Authorization: Bearer {token}"] if token else []
    return run_node(node, INSPECTOR, ["--cli", gateway.mcp_url, *args, *headers], home=tmp_path)


def test_inspector_lists_the_tools_an_analyst_may_call(node: Path, tmp_path: Path, gateway: GatewayProcess) -> None:
    run = inspector(node, tmp_path, gateway, gateway.token("inspector", ["analysts"]), "--method", "tools/list")
    assert run.code == 0, run.stderr
    listed: Any = run.json()
    assert sorted(t["name"] for t in listed["tools"]) == ANALYST_TOOLS


def test_inspector_calls_a_tool(node: Path, tmp_path: Path, gateway: GatewayProcess) -> None:
    token = gateway.token("inspector", ["analysts"])
    run = inspector(
        node,
        tmp_path,
        gateway,
        token,
        "--method",
        "tools/call",
        "--tool-name",
        "echo",
        "--tool-arg",
        "text=hello from inspector",
    )
    assert run.code == 0, run.stderr
    result: Any = run.json()
    assert result["structuredContent"] == {"text": "hello from inspector"}


def test_inspector_sees_a_policy_denial_as_a_tool_error(node: Path, tmp_path: Path, gateway: GatewayProcess) -> None:
    token = gateway.token("inspector", ["analysts"])
    run = inspector(
        node,
        tmp_path,
        gateway,
        token,
        "--method",
        "tools/call",
        "--tool-name",
        "echo",
        "--tool-arg",
        "text=please drop table users",
    )
    result: Any = json.loads(run.stdout[: run.stdout.rindex("}") + 1]) if "{" in run.stdout else None
    assert run.code == 5, run.stderr  # the Inspector's exit code for a tool result with isError
    assert result["isError"] is True
    body = json.loads(result["content"][0]["text"])
    assert body == {
        "decision": "deny",
        "stage": "policy",
        "code": "denied",
        "reasons": ['argument text contains blocked text "drop table"'],
    }


def test_inspector_without_a_token_is_sent_to_oauth(node: Path, tmp_path: Path, gateway: GatewayProcess) -> None:
    run = inspector(node, tmp_path, gateway, None, "--method", "tools/list")
    assert run.code != 0
    assert "auth_required" in run.stdout + run.stderr
