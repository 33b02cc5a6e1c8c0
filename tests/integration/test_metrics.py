"""/metrics as an operator reads it: process metrics, and a known tool never labelled `(unknown)`."""

from __future__ import annotations

import aiohttp
import pytest

from tests.gateway_process import GatewayProcess
from tests.integration.conftest import raw_call

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def _metrics(gateway: GatewayProcess) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{gateway.base_url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_a_call_refused_before_its_tool_resolved_keeps_the_tool_name(gateway: GatewayProcess) -> None:
    token = gateway.token("metrics-agent", ["analysts"])
    refused = await raw_call(gateway, token, "echo", {"text": 42})  # wrong argument type
    assert refused["isError"] is True
    await raw_call(gateway, token, "no.such.tool", {})
    text = await _metrics(gateway)
    echo = [
        line for line in text.splitlines() if line.startswith("castellan_tool_calls_total{") and 'tool="echo"' in line
    ]
    # refused before the tool ran (its arguments are checked by the validate stage): still counted as echo
    assert any('decision="deny"' in line and 'stage="validate"' in line for line in echo), echo
    assert 'tool="(unknown)"' in text  # a name no tool has is folded, so callers cannot mint labels


async def test_metrics_include_the_process(gateway: GatewayProcess) -> None:
    text = await _metrics(gateway)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info"):
        assert name in text
