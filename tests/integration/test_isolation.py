"""Tool isolation through a running gateway: each attack an outside review found, run and contained.

Real processes: the gateway, its sandboxed DuckDB workers and function workers (bubblewrap).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.sandbox import StdioProfile, detect_mode
from server.settings import UpstreamSettings
from server.upstream.connection import UpstreamConnection
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import raw_call

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
needs_bwrap = pytest.mark.skipif(not detect_mode("auto").isolated, reason=detect_mode("auto").reason)
REPO = Path(__file__).resolve().parents[2]
HEAVY = "SELECT count(*) FROM " + ", ".join(f"main.sales.orders t{i}" for i in range(7))


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, clock ticks
    return total / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def sql_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {
        "CASTELLAN_TOOLS__SQL_TIMEOUT_SECONDS": "4",
        "CASTELLAN_TOOLS__SQL_MEMORY_MB": "256",
        "CASTELLAN_TOOLS__SQL_TEMP_MB": "64",
        "CASTELLAN_TOOLS__SQL_WORKERS": "2",
        "CASTELLAN_TOOLS__SQL_WORKERS_PER_IDENTITY": "1",
    }
    with run_gateway(tmp_path_factory.mktemp("iso-sql"), env) as gw:
        yield gw


async def test_a_hostile_query_is_contained_in_its_worker(sql_gateway: GatewayProcess) -> None:
    gw = sql_gateway
    token = gw.token("hostile-analyst", ["analysts"])
    warm = await raw_call(gw, token, "sql.query", {"query": "SELECT 1 AS warm"})  # the guard's allow-list loaded
    assert warm.get("isError") is not True, warm
    before = _rss_mb(gw.process.pid)
    peak = before

    async def watch(task: asyncio.Future[object]) -> None:
        nonlocal peak
        while not task.done():
            peak = max(peak, _rss_mb(gw.process.pid))
            await asyncio.sleep(0.05)

    query = asyncio.ensure_future(raw_call(gw, token, "sql.query", {"query": "SELECT list_sum(range(100000000))"}))
    await asyncio.gather(query, watch(query))
    result = query.result()
    assert isinstance(result, dict)
    # the worker hit its memory ceiling and said so; the gateway itself never held the list
    assert result.get("isError") is True, result
    assert "memory" in json.dumps(result).lower()
    assert peak - before < 150, (before, peak)
    fine = await raw_call(gw, token, "sql.query", {"query": "SELECT 41 + 1 AS answer"})
    assert fine["structuredContent"]["rows"] == [[42]]  # type: ignore[index]


async def test_a_runaway_query_stops_at_its_timeout_without_starving_others(sql_gateway: GatewayProcess) -> None:
    gw = sql_gateway
    heavy_token = gw.token("heavy-analyst", ["analysts"])
    light_token = gw.token("light-analyst", ["analysts"])
    heavy = [asyncio.ensure_future(raw_call(gw, heavy_token, "sql.query", {"query": HEAVY})) for _ in range(3)]
    await asyncio.sleep(0.5)
    light = await raw_call(gw, light_token, "sql.query", {"query": "SELECT 1 AS one"})
    # answered while the heavy agent's queries still run (it holds at most its share of the workers)
    assert light.get("isError") is not True, light
    assert light["structuredContent"]["rows"] == [[1]]  # type: ignore[index]
    assert not all(task.done() for task in heavy)
    for result in await asyncio.gather(*heavy):
        assert result.get("isError") is True
        assert "timed out after 4 s" in json.dumps(result)
    # nothing keeps burning CPU after the calls returned
    workers = _descendants(gw.process.pid)
    spent = _cpu_seconds(workers)
    await asyncio.sleep(2)
    assert _cpu_seconds(workers) - spent < 0.5


async def test_a_spilling_query_writes_only_into_its_private_temp_area(sql_gateway: GatewayProcess) -> None:
    gw = sql_gateway
    token = gw.token("sorting-analyst", ["analysts"])
    cwd_before = set(os.listdir(os.getcwd()))
    data_before = {p for p in gw.data_dir.rglob("*") if "sql-spill" not in p.parts}
    sort = "SELECT max(x) FROM (SELECT unnest(range(20000000)) AS x ORDER BY random() LIMIT 19000000)"
    result = await raw_call(gw, token, "sql.query", {"query": sort})
    # it finished or ran out of its bounded spill space; either way no file landed outside it
    assert "structuredContent" in result or result.get("isError") is True
    assert set(os.listdir(os.getcwd())) == cwd_before
    new = {p for p in gw.data_dir.rglob("*") if "sql-spill" not in p.parts} - data_before
    assert all(p.suffix in (".db-wal", ".db-shm", ".db", ".log", ".json") for p in new), new


async def test_engine_state_is_not_reachable_by_query_shape(sql_gateway: GatewayProcess) -> None:
    gw = sql_gateway
    token = gw.token("curious-analyst", ["analysts"])
    for query in (
        "SELECT * FROM (WITH duckdb_settings AS (SELECT 1) SELECT 1), duckdb_settings",
        "WITH x AS (SELECT * FROM duckdb_settings), duckdb_settings AS (SELECT 1) SELECT * FROM x",
        "SELECT \"current_setting\"('home_directory')",
        "SELECT 'HOME'.getenv()",
        "SELECT json_execute_serialized_sql('{}')",
    ):
        result = await raw_call(gw, token, "sql.query", {"query": query})
        assert result.get("isError") is True, (query, result)
        assert "refused" in json.dumps(result), (query, result)


@pytest.fixture(scope="module")
def function_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {
        "CASTELLAN_TOOLS__FUNCTION_MODULES": '["tests.fixtures.hostile_functions"]',
        "CASTELLAN_TOOLS__FUNCTION_TIMEOUT_SECONDS": "2",
        "CASTELLAN_LLM_API_KEY": "sk-test-must-not-leak",
        "CASTELLAN_TEST_GRANTED": "granted-value",
    }
    with run_gateway(tmp_path_factory.mktemp("iso-fn"), env) as gw:
        yield gw


def _result(call: dict[str, object]) -> object:
    assert call.get("isError") is not True, call
    return call["structuredContent"]["result"]  # type: ignore[index]


@needs_bwrap
async def test_a_function_cannot_read_the_gateways_secrets_or_reach_the_network(
    function_gateway: GatewayProcess,
) -> None:
    gw = function_gateway
    token = gw.token("fn-prober", ["analysts"])
    key = gw.data_dir / "dev-signing-key.json"
    assert key.exists()
    read = _result(await raw_call(gw, token, "main.tools.probe_file", {"path": str(key)}))
    assert read == "refused: FileNotFoundError"
    for path in (gw.log_path, gw.data_dir / "audit.db", f"/proc/{gw.process.pid}/environ", REPO / "pyproject.toml"):
        seen = _result(await raw_call(gw, token, "main.tools.probe_file", {"path": str(path)}))
        assert seen == "refused: FileNotFoundError", (path, seen)
    env = _result(await raw_call(gw, token, "main.tools.probe_env", {}))
    assert isinstance(env, dict)
    assert env["CASTELLAN_TEST_GRANTED"] == "granted-value"  # granted by its declaration
    # nothing else of the gateway's environment (PWD from the sandbox, LC_CTYPE from Python's locale coercion)
    assert set(env) <= {"CASTELLAN_TEST_GRANTED", "PWD", "LC_CTYPE"}, env
    assert "sk-test-must-not-leak" not in json.dumps(env)
    net = _result(await raw_call(gw, token, "main.tools.probe_network", {"host": "127.0.0.1", "port": gw.port}))
    assert str(net).startswith("refused"), net
    spawn = _result(await raw_call(gw, token, "main.tools.probe_spawn", {}))
    assert spawn == "refused: PermissionError"
    assert '"tool_sandbox"' in gw.log()
    assert "bubblewrap" in gw.log()


async def test_a_function_timeout_ends_only_that_call(function_gateway: GatewayProcess) -> None:
    gw = function_gateway
    slow_token = gw.token("fn-slow", ["analysts"])
    other_token = gw.token("fn-other", ["analysts"])
    stuck = asyncio.ensure_future(raw_call(gw, slow_token, "main.tools.nap", {"seconds": 60}))
    await asyncio.sleep(0.3)
    inflight = asyncio.ensure_future(raw_call(gw, other_token, "main.tools.nap", {"seconds": 1.5}))
    timed_out = await stuck
    assert timed_out.get("isError") is True
    assert "timed out after 2 s" in json.dumps(timed_out)
    # the other agent's call on the same function was in flight when the first one was killed, and completes
    assert _result(await inflight) == "awake"
    assert _result(await raw_call(gw, other_token, "main.tools.nap", {"seconds": 0})) == "awake"


async def _probe(connection: UpstreamConnection, tool: str, **arguments: object) -> str:
    result = await connection.call_tool(tool, dict(arguments))
    return "".join(getattr(block, "text", "") for block in result.content)


@needs_bwrap
async def test_a_stdio_upstream_runs_under_its_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the gateway's secret")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    monkeypatch.setenv("CASTELLAN_LLM_API_KEY", "sk-test-must-not-leak")
    monkeypatch.setenv("PROBE_PASSED", "yes")
    repo = REPO
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    profile = StdioProfile(read_only=[repo], writable=[outbox], env=["PROBE_PASSED"], cwd=repo)
    settings = UpstreamSettings(
        name="probe", command=[sys.executable, "-m", "tests.fixtures.probe_server"], sandbox=profile
    )
    connection = UpstreamConnection(settings)
    try:
        assert await _probe(connection, "read", path=str(secret)) == "refused: FileNotFoundError"
        assert await _probe(connection, "write", path=str(outbox / "x")) == "written"
        assert (outbox / "x").read_text() == "probe"
        assert await _probe(connection, "write", path=str(repo / "probe.txt")) == "refused: OSError"
        names = (await _probe(connection, "env")).split(",")
        assert "PROBE_PASSED" in names
        assert "CASTELLAN_LLM_API_KEY" not in names
        assert await _probe(connection, "connect", host="127.0.0.1", port=port) == "refused: ConnectionRefusedError"
    finally:
        await connection.close()
        listener.close()
    assert not (repo / "probe.txt").exists()

    # the same server without a profile reaches what the profile kept from it (the test's premise holds)
    bare = UpstreamConnection(UpstreamSettings(name="bare", command=settings.command))
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        assert (await _probe(bare, "read", path=str(secret))).startswith("read:")
        assert await _probe(bare, "connect", host="127.0.0.1", port=listener.getsockname()[1]) == "connected"
    finally:
        await bare.close()
        listener.close()
