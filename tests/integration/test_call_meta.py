"""Malformed `_meta` and header values through the real edge (a running gateway): each `tools/call`
is answered (a result, a denial, or a JSON-RPC invalid-params error naming the field) and never with
an internal error, and every one of them has a decision row in the audit log. Property-based over
the values a caller can declare: run id, depth, traceparent, progress token, any other `_meta` field,
in any JSON type, with non-ASCII digits, huge or negative numbers, overlong strings, control
characters."""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.load import PROTOCOL, call_headers
from server.runs import MAX_DEPTH
from tests.gateway_process import GatewayProcess, run_gateway

pytestmark = pytest.mark.integration
HUGE = "__HUGE_NUMBER__"  # replaced by a 4,000-digit JSON number in the body
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SANE_RUN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}", re.ASCII)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, requests.Session]]:
    env = {"CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0", "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
           "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0"}  # fmt: skip
    with run_gateway(tmp_path_factory.mktemp("meta"), env) as gw, requests.Session() as session:
        session.headers.update(call_headers("echo", gw.token("meta-fuzzer", ["analysts"])))
        yield gw, session
        assert "Traceback" not in gw.log().replace("call_unreadable", "")


def decision_of(gw: GatewayProcess, marker: str) -> dict[str, Any] | None:
    with sqlite3.connect(gw.data_dir / "audit.db") as db:
        row = db.execute(
            "SELECT record FROM outbox WHERE kind = 'decision' AND json_extract(record, '$.arguments.text') = ?",
            (marker,),
        ).fetchone()
    return json.loads(row[0]) if row else None


def send(target: tuple[GatewayProcess, requests.Session], meta: Any, headers: dict[str, str]) -> None:
    gw, session = target
    marker = uuid.uuid4().hex
    base = {"io.modelcontextprotocol/protocolVersion": PROTOCOL,
            "io.modelcontextprotocol/clientInfo": {"name": "meta-fuzzer", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}  # fmt: skip
    full_meta = {**base, **meta} if isinstance(meta, dict) else meta
    params = {"name": "echo", "arguments": {"text": marker}, "_meta": full_meta}
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})
    body = body.replace(f'"{HUGE}"', "9" * 4000)
    response = session.post(gw.mcp_url, data=body.encode(), headers=headers, timeout=60)
    assert response.status_code < 500, response.text[:300]
    assert "Traceback" not in response.text
    try:
        answer = response.json()
    except ValueError:
        # Refused by the HTTP server before the gateway saw a request (a header it will not parse):
        # no call was made, so there is nothing to decide.
        assert response.status_code == 400, response.text[:300]
        return
    decision = decision_of(gw, marker)
    if "error" in answer:
        error = answer["error"]
        assert error["code"] != -32603, answer  # never an internal error
        if decision is None:
            # The protocol layer refused the message before it was a call of any protocol version (no
            # `_meta` envelope, an unsupported version, headers that contradict the body), and said why.
            assert error["code"] in (-32602, -32020, -32022), answer
            assert re.search(r"_meta|envelope|header|protocol version", error["message"], re.I), answer
            return
        assert error["code"] == -32602, answer  # a call whose params the MCP layer refused: recorded
        assert error["data"].startswith("invalid tools/call params: ")
        assert (decision["decision"], decision["stage"]) == ("deny", "request")
        return
    assert decision is not None, f"no decision row for a call answered {answer}"
    result = answer["result"]
    if result["isError"]:
        body = json.loads(result["content"][0]["text"])
        assert body["decision"] == "deny", body  # a refusal with its reasons, not an internal error
        assert body["reasons"]
    else:
        assert result["content"][0]["text"] == marker
    assert SANE_RUN.fullmatch(decision["run_id"])
    assert type(decision["run_depth"]) is int
    assert 0 <= decision["run_depth"] <= MAX_DEPTH
    assert decision["traceparent"] in (None, TRACEPARENT)


nonascii_digits = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6).filter(
    lambda s: not s.isascii()
)
specials = st.sampled_from([
    "\u00b2", "\u0663", "\uff13", "\U0001d7d1", "3\n", " 3", "+3", "-1", "1e3", "0x10", "3.5", "99999", "007",
    "run\n", "r\u200bun", "\uff52un", TRACEPARENT, TRACEPARENT + "\n", "ff" + TRACEPARENT[2:], TRACEPARENT.upper(),
    f"00-{'0' * 32}-00f067aa0ba902b7-01", "\x00", "\x1b[31m", HUGE,
])  # fmt: skip
scalars = (
    specials
    | nonascii_digits
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
    | st.text(max_size=40)
    | st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl"]), max_size=8)
    | st.integers(min_value=129, max_value=20_000).map(lambda n: "r" * n)
)
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=6), scalars, max_size=3)
meta_keys = st.sampled_from(["io.castellan/runId", "run_id", "io.castellan/depth", "depth", "traceparent",
                             "progressToken", "io.castellan/other", "io.modelcontextprotocol/clientInfo"])  # fmt: skip
metas = st.dictionaries(meta_keys | st.text(max_size=12), values, max_size=5) | st.lists(scalars, max_size=2)
header_names = st.sampled_from(["x-castellan-run-id", "x-castellan-run-depth", "traceparent", "x-castellan-foo"])
header_values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=300).map(str.strip)
    | specials.filter(lambda v: v.isprintable() and v.isascii()).map(str.strip)
    | st.integers(min_value=129, max_value=8_000).map(lambda n: "r" * n)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(meta=metas, headers=st.dictionaries(header_names, header_values, max_size=3))
@example(meta={"io.castellan/depth": "\u00b2"}, headers={})  # the finding: it crashed the handler, no row
@example(meta={"io.castellan/depth": HUGE}, headers={})
@example(meta={}, headers={"x-castellan-run-depth": "\u00b2".encode().decode("latin-1")})
@example(meta={"io.castellan/runId": "run\n", "traceparent": TRACEPARENT + "\n"}, headers={})
@example(meta={"progressToken": {"a": 1}}, headers={})
@example(meta={"progressToken": 1.5}, headers={})
@example(meta=["not", "an", "object"], headers={})
@example(meta={"io.modelcontextprotocol/clientInfo": "\u00b2"}, headers={})
def test_every_call_with_malformed_meta_or_headers_is_answered_and_recorded(
    target: tuple[GatewayProcess, requests.Session], meta: Any, headers: dict[str, str]
) -> None:
    send(target, meta, headers)


def test_a_number_too_long_to_parse_is_a_parse_error(target: tuple[GatewayProcess, requests.Session]) -> None:
    """Past Python's 4,300-digit limit the body is not JSON the gateway can read: no call is made."""
    gw, session = target
    body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"_meta":{"depth":'
    response = session.post(gw.mcp_url, data=(body + "9" * 5000 + "}}}").encode(), timeout=60)
    assert response.json()["error"]["code"] == -32700


def test_an_ignored_value_is_named_in_the_log(target: tuple[GatewayProcess, requests.Session]) -> None:
    gw, _ = target
    send(target, {"io.castellan/depth": "\u0663"}, {})
    assert "_meta io.castellan/depth: not a depth" in gw.log()
