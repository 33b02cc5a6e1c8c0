"""The first hour as a new user lives it: the demo on any port, a token from a second terminal, shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from bench.load import call_body, call_headers
from tests.gateway_process import GatewayProcess, castellan, free_port, gateway_env, run_gateway
from tests.integration.conftest import run_cli

pytestmark = [pytest.mark.integration]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return castellan(*args, env=env, timeout=60)


def test_token_before_any_gateway_refuses_instead_of_creating_a_second_key(tmp_path: Path) -> None:
    env = {**os.environ, **gateway_env(tmp_path, free_port())}
    done = _cli(env, "token", "--agent", "a")
    assert done.returncode == 1
    assert "start the gateway first" in done.stderr
    assert not (tmp_path / "dev-signing-key.json").exists()


async def _echo(url: str, token: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=call_body("echo", {"text": "hi"}, 1), headers=call_headers("echo", token)) as resp,
    ):
        body = json.loads(await resp.text())
    assert isinstance(body, dict)
    return body


def test_serve_on_another_port_prints_its_url_and_a_token_from_a_second_terminal_works(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **gateway_env(tmp_path, 8750)}  # the settings still say 8750; the flag says otherwise
    url = f"http://127.0.0.1:{port}/mcp"
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)], env=env, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    f"http://127.0.0.1:{port}/readyz"], capture_output=True, text=True)  # fmt: skip
            if ready.stdout == "200":
                break
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert f"Castellan demo: MCP endpoint {url}" in (tmp_path / "serve.log").read_text()
        token = _cli(env, "token", "--agent", "second-terminal", "--groups", "analysts").stdout.strip()
        body = asyncio.run(_echo(url, token))
        assert body["result"]["structuredContent"] == {"text": "hi"}, body  # type: ignore[index]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    # once that gateway is gone, its URL is no longer used
    stale = _cli(env, "token", "--agent", "later").stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(stale + "=" * (-len(stale) % 4)))
    assert claims["aud"] == "http://127.0.0.1:8750/mcp"


# A call longer than uvicorn's default 10 s grace, within the tool and function timeouts.
FUNCTIONS = {
    "CASTELLAN_TOOLS__FUNCTION_MODULES": json.dumps(["tests.fixtures.functions"]),
    "CASTELLAN_TOOLS__FUNCTION_TIMEOUT_SECONDS": "25",
}
SLOW_SECONDS = 12


@pytest.mark.anyio
async def test_sigterm_lets_a_running_call_finish_and_audits_it(tmp_path: Path) -> None:
    with run_gateway(tmp_path, FUNCTIONS) as gw:
        for statement in ("USE SCHEMA, EXECUTE ON SCHEMA main.tests TO analysts",):
            assert run_cli(gw, "grants", "grant", *statement.split()).returncode == 0
        token = gw.token("slow-agent", ["analysts"])
        answer: dict[str, object] = {}

        async def call() -> None:
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    gw.mcp_url,
                    data=call_body("main.tests.sleep", {"seconds": SLOW_SECONDS}, 1),
                    headers=call_headers("main.tests.sleep", token),
                ) as resp,  # fmt: skip
            ):
                answer["status"] = resp.status
                answer["body"] = json.loads(await resp.text())

        running = asyncio.create_task(call())
        await asyncio.sleep(1.0)  # the call is running in its worker
        threading.Thread(target=gw.process.send_signal, args=(signal.SIGTERM,)).start()
        await running
        gw.process.wait(timeout=30)
        assert answer["status"] == 200, answer
        result = answer["body"]["result"]  # type: ignore[index]
        assert result.get("isError") is not True, result
        found = run_cli(gw, "audit", "search", "--agent", "slow-agent", "--format", "jsonl")
        (record,) = [json.loads(line) for line in found.stdout.splitlines()]
        assert record["decision"] == "allow"
        assert record["outcome"] is not None, record
        assert isinstance(gw, GatewayProcess)


def test_tools_list_shows_each_tool_with_its_securable_and_what_a_caller_needs(tmp_path: Path) -> None:
    env = {**os.environ, **gateway_env(tmp_path, free_port())}
    done = _cli(env, "tools", "list")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert "main.tools.sql_query" in lines["sql.query"]
    assert "EXECUTE on main.tools.sql_query" in lines["sql.query"]
    assert "SELECT on main.support.docs" in lines["docs.search"]
    assert "USE SCHEMA on main.admin" in lines["demo.reset"]
    listed = json.loads(_cli(env, "tools", "list", "--json").stdout)
    echo = next(t for t in listed if t.get("tool") == "echo")
    assert echo["needs"] == ["USE CATALOG on main", "USE SCHEMA on main.tools", "EXECUTE on main.tools.echo"]
