"""Property-based fuzzing of the running gateway: JSON-RPC messages and headers on /mcp, arbitrary
tool arguments, and the HTTP API from its OpenAPI document (schemathesis). No input may produce a
5xx or a traceback, and no tool may run without a decision committed to the audit log first."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.load import PROTOCOL, call_body, call_headers
from tests.gateway_process import GatewayProcess, run_gateway

pytestmark = pytest.mark.integration
TRIED: dict[str, int] = {"jsonrpc": 0, "arguments": 0}
LEGAL_STATUSES = {200, 202, 400, 401, 403, 404, 405, 406, 413, 415, 421, 422}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, requests.Session]]:
    env = {"CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0", "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
           "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0", "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
           "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0"}  # fmt: skip
    with run_gateway(tmp_path_factory.mktemp("fuzz"), env) as gw, requests.Session() as session:
        session.headers["authorization"] = f"Bearer {gw.token('fuzzer', ['analysts'])}"
        yield gw, session
    print(f"\nfuzzing: {TRIED['jsonrpc']} JSON-RPC messages, {TRIED['arguments']} argument sets tried")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
methods = st.sampled_from(
    ["tools/call", "tools/list", "initialize", "ping", "resources/list", "prompts/get", "notifications/initialized",
     "completion/complete", "logging/setLevel", "server/discover", "", "tools/call\u0000", "x" * 300]
) | st.text(max_size=30)  # fmt: skip
messages = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]) | json_values,
        "id": st.integers() | st.text(max_size=10) | st.none() | json_values,
        "method": methods,
        "params": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["echo", "sql.query", "demo.reset", "docs.search"]) | st.text(max_size=20),
                "arguments": json_values,
                "_meta": st.fixed_dictionaries(
                    {},
                    optional={
                        "io.modelcontextprotocol/protocolVersion": st.sampled_from(
                            [PROTOCOL, "2025-11-25", "1999-01-01"]
                        )
                        | json_values
                    },
                )
                | json_values,
            },
        )
        | json_values,
    },
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "mcp-protocol-version": st.sampled_from([PROTOCOL, "2025-11-25", "2025-06-18", "garbage", ""]),
        "mcp-method": st.sampled_from(["tools/call", "tools/list", "bogus"]),
        "mcp-name": st.sampled_from(["echo", "sql.query", "nope"]),
        "content-type": st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1"]),
        "accept": st.sampled_from(["application/json, text/event-stream", "text/html", "*/*"]),
        "mcp-session-id": st.text(alphabet="0123456789abcdef", max_size=32),
    },
)


def check(response: requests.Response) -> None:
    assert response.status_code in LEGAL_STATUSES, (response.status_code, response.text[:500])
    assert "Traceback" not in response.text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=messages | json_values, extra=headers, raw=st.booleans())
def test_json_rpc_messages_and_headers(target: tuple[GatewayProcess, requests.Session], body: Any,
                                       extra: dict[str, str], raw: bool) -> None:  # fmt: skip
    gw, session = target
    data = json.dumps(body).encode() if not raw else json.dumps(body).encode()[: max(1, len(json.dumps(body)) // 2)]
    response = session.post(
        gw.mcp_url, data=data, headers={"accept": "application/json, text/event-stream", **extra}, timeout=30
    )
    TRIED["jsonrpc"] += 1
    check(response)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tool=st.sampled_from(["echo", "sql.query", "docs.search", "demo.profile", "main.tools.apply_discount",
                             "main.tools.days_between", "clock.now"]),
       arguments=st.dictionaries(st.sampled_from(["text", "query", "price", "percent", "start", "end", "limit",
                                                  "mode", "customer_id", "max_rows"]) | st.text(max_size=8),
                                 json_values, max_size=4))  # fmt: skip
def test_arbitrary_tool_arguments(target: tuple[GatewayProcess, requests.Session], tool: str,
                                  arguments: dict[str, Any]) -> None:  # fmt: skip
    gw, session = target
    response = session.post(gw.mcp_url, data=call_body(tool, arguments, 1), headers=call_headers(tool), timeout=60)
    TRIED["arguments"] += 1
    check(response)
    assert response.status_code == 200
    result = response.json()["result"]
    if result.get("isError"):
        assert result["content"][0]["text"]  # a denial or a tool error, with its reason


def test_no_tool_ran_without_a_decision(target: tuple[GatewayProcess, requests.Session]) -> None:
    gw, _ = target
    with sqlite3.connect(Path(gw.data_dir) / "audit.db") as db:
        orphans = db.execute(
            "SELECT COUNT(*) FROM outbox o WHERE o.kind = 'outcome' AND NOT EXISTS (SELECT 1 FROM outbox d "
            "WHERE d.call_id = o.call_id AND d.kind = 'decision' AND d.seq < o.seq)"
        ).fetchone()[0]
        decisions = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'decision'").fetchone()[0]
    assert orphans == 0
    assert decisions >= 300  # every fuzzed call was decided and recorded
    assert "Traceback" not in gw.log()


def test_the_http_api_against_its_openapi_document(target: tuple[GatewayProcess, requests.Session]) -> None:
    """schemathesis: every operation, generated and mutated inputs, all its checks (no 5xx, documented
    statuses and content types, schema-valid requests accepted, schema-violating ones refused)."""
    gw, _ = target
    admin = gw.token("fuzz-admin", scopes=["castellan:admin"])
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{gw.base_url}/openapi.json", "-H",
         f"Authorization: Bearer {admin}", "--checks", "all", "--max-examples", "60", "--max-time", "90",
         "--seed", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    tail = done.stdout[-3000:]
    generated = [line for line in done.stdout.splitlines() if "generated" in line]
    print(f"\nschemathesis: {generated[-1].strip() if generated else '?'}")
    assert done.returncode == 0, tail
