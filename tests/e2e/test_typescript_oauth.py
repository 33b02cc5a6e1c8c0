"""The official TypeScript SDK's OAuth client (v1 and v2) signs in to the demo gateway at its own dev issuer."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E, run_node
from tests.gateway_process import ANALYST_TOOLS, GatewayProcess

pytestmark = pytest.mark.e2e


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_typescript_sdk_signs_in_at_the_dev_issuer_calls_and_refreshes(
    node: Path, tmp_path: Path, gateway: GatewayProcess, version: str
) -> None:
    run = run_node(node, E2E / "clients" / "ts_oauth_client.mjs", [version, gateway.mcp_url, "alice"], home=tmp_path)
    assert run.code == 0, run.stderr
    result: Any = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["iss"] == gateway.base_url
    assert result["tools"] == ANALYST_TOOLS
    assert result["echo"]["structuredContent"] == {"text": f"signed in with ts {version}"}
    assert result["again"]["structuredContent"] == {"text": "after the refresh"}
    assert result["refreshed"] != result["first"]
    first, refreshed = _claims(result["first"]), _claims(result["refreshed"])
    assert (first["iss"], first["sub"], first["groups"]) == (gateway.base_url, "alice", ["analysts"])
    assert first["agent_id"] == result["clientId"] == refreshed["agent_id"]
    assert refreshed["aud"] == gateway.mcp_url
