"""The edge's lean path and the SDK's path answer a user identically: the same results and the same audit
records for tools/list and tools/call, built-in and proxied to an upstream, in both protocol eras."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from bench.load import CLIENT_INFO, PROTOCOL, open_session, parse_body
from tests.gateway_process import GatewayProcess, free_port, run_gateway, stop
from tests.integration.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

VARYING = ("call_id", "request_id", "ts", "time", "started_at", "ended_at", "ms", "run_id", "seq")
"""Keys whose values differ between any two calls (ids, clocks, durations): not compared."""


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """The bench's plain mcp SDK echo server (both eras) on a loopback port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    proc = subprocess.Popen([sys.executable, "-m", "bench.direct_server", str(port)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.monotonic() < deadline, "upstream did not start"
                time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def request(method: str, params: dict[str, Any], era: str, request_id: int) -> dict[str, Any]:
    if era == "2026":
        params = {
            **params,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": PROTOCOL,
                "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        }
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


async def exchange(gw: GatewayProcess, token: str, era: str) -> list[Any]:
    """tools/list, then tools/call of the built-in echo, the proxied echo and an unknown tool."""
    base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    base["authorization"] = f"Bearer {token}"
    steps: list[tuple[str, dict[str, Any]]] = [
        ("tools/list", {}),
        ("tools/call", {"name": "echo", "arguments": {"text": f"built-in {era}"}}),
        ("tools/call", {"name": "up.echo", "arguments": {"text": f"proxied {era}"}}),
        ("tools/call", {"name": "no.such", "arguments": {}}),
    ]
    answers = []
    async with aiohttp.ClientSession() as session:
        headers = dict(base)
        if era == "2025":
            headers |= await open_session(session, gw.mcp_url, base)
        for i, (method, params) in enumerate(steps, start=1):
            sent = dict(headers)
            if era == "2026":
                sent |= {"mcp-protocol-version": PROTOCOL, "mcp-method": method}
                if "name" in params:
                    sent["mcp-name"] = params["name"]
            async with session.post(gw.mcp_url, json=request(method, params, era, i), headers=sent) as resp:
                answers.append((resp.status, parse_body(resp.headers.get("content-type", ""), await resp.read())))
    return answers


def records(gw: GatewayProcess, agent: str) -> list[dict[str, Any]]:
    done = run_cli(gw, "audit", "search", "--agent", agent, "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines()]
    return sorted((comparable(r) for r in found), key=lambda r: json.dumps(r, sort_keys=True))


def comparable(value: Any) -> Any:
    """`value` without what differs between any two calls (ids, clocks, durations, the client's port) or
    between the two gateways (in dev mode each is its own token issuer, named by its own base URL)."""
    if isinstance(value, dict):
        varying = {*VARYING, "address", "issuer"}
        return {k: comparable(v) for k, v in value.items() if k not in varying and not k.endswith(("_ms", "_at"))}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def start(stack: contextlib.ExitStack, tmp: Path, name: str, url: str, fast: bool) -> GatewayProcess:
    env = {
        "CASTELLAN_UPSTREAMS": json.dumps([{"name": "up", "url": url}]),
        "CASTELLAN_SERVER__FAST_PATH": "true" if fast else "false",
    }
    gw = stack.enter_context(run_gateway(tmp / name, env, timeout=120))
    for statement in ("USE SCHEMA ON SCHEMA main.upstream", "EXECUTE ON SCHEMA main.upstream"):
        done = run_cli(gw, "grants", "grant", *statement.split(), "TO", "analysts")
        assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 120
    while "up.echo" not in listed_names(gw):
        assert time.monotonic() < deadline, "the upstream's tools were not served"
        time.sleep(0.5)
    return gw


def listed_names(gw: GatewayProcess) -> set[str]:
    """The tools an analyst is shown (over HTTP: the CLI's start-up alone is seconds on a loaded machine)."""
    body = json.dumps(request("tools/list", {}, "2026", 1)).encode()
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "authorization": f"Bearer {gw.token('lister', ['analysts'])}",
        "mcp-protocol-version": PROTOCOL,
        "mcp-method": "tools/list",
    }
    with urllib.request.urlopen(urllib.request.Request(gw.mcp_url, data=body, headers=headers), timeout=30) as resp:
        return {t["name"] for t in json.loads(resp.read())["result"]["tools"]}


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """One gateway with the lean path, one without, in front of the same upstream."""
    tmp = tmp_path_factory.mktemp("edge-paths")
    with upstream() as url, contextlib.ExitStack() as stack:
        yield start(stack, tmp, "lean", url, fast=True), start(stack, tmp, "sdk", url, fast=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("era", ["2026", "2025"])
async def test_the_lean_and_the_sdk_path_give_the_same_results_and_audit_records(
    gateways: tuple[GatewayProcess, GatewayProcess], era: str
) -> None:
    lean, sdk = gateways
    agent = f"paths-{era}"
    lean_answers = await exchange(lean, lean.token(agent, ["analysts"]), era)
    sdk_answers = await exchange(sdk, sdk.token(agent, ["analysts"]), era)
    assert lean_answers == sdk_answers
    (_, listed), (_, builtin), (_, proxied), (_, unknown) = lean_answers
    assert {"echo", "up.echo"} <= {t["name"] for t in listed["result"]["tools"]}
    assert builtin["result"]["structuredContent"] == {"text": f"built-in {era}"}
    assert proxied["result"]["structuredContent"] == {"text": f"proxied {era}"}
    assert json.loads(unknown["result"]["content"][0]["text"])["stage"] == "resolve"
    deadline = time.monotonic() + 30
    while len(lean_records := records(lean, agent)) < 3 or len(sdk_records := records(sdk, agent)) < 3:
        assert time.monotonic() < deadline, "the calls were not all audited"
        await anyio.sleep(0.3)
    assert lean_records == sdk_records
    assert {r["client"]["name"] for r in lean_records} == {CLIENT_INFO["name"]}
