"""The official TypeScript SDK clients, v1 and v2, against the real gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E, run_node
from tests.gateway_process import ANALYST_TOOLS, GatewayProcess

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_typescript_sdk_lists_calls_and_sees_a_denial(
    node: Path, tmp_path: Path, gateway: GatewayProcess, version: str
) -> None:
    token = gateway.token(f"ts-{version}", ["analysts"])
    run = run_node(node, E2E / "clients" / "ts_client.mjs", [version, gateway.mcp_url, token], home=tmp_path)
    assert run.code == 0, run.stderr
    result: Any = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tools"] == ANALYST_TOOLS
    assert result["echo"]["structuredContent"] == {"text": f"hello from ts {version}"}
    assert result["denied"]["isError"] is True
    body = json.loads(result["denied"]["content"][0]["text"])
    assert (body["decision"], body["stage"]) == ("deny", "policy")
    assert body["reasons"] == ['argument text contains blocked text "drop table"']
