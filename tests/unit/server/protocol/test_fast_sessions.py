"""The edge's lean path on 2025-era sessions answers exactly what the SDK answers for the same requests
(results, refusals, protocol errors, unknown and foreign sessions), and leaves to the SDK every request
it does not serve; a client's cancellation stops a request it serves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.auth.devkeys import mint_dev_token
from server.protocol.fast_sessions import Flights
from server.settings import Settings

BASE = "http://127.0.0.1:8750"
VERSION = "2025-11-25"


class Agent:
    """A 2025-era client of one gateway app: its token, its session, its request ids."""

    def __init__(self, client: TestClient, settings: Settings, name: str = "agent-1") -> None:
        self.client = client
        issuer = getattr(settings, "issuer", "castellan-dev")  # dev mode's issuer (the base URL, once it is)
        self.token = mint_dev_token(
            settings.data_dir, agent=name, issuer=issuer, audience=settings.resource_url, groups=["analysts"]
        )
        self.session = ""
        self.next_id = 0

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {
            "authorization": f"Bearer {self.token}",
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": VERSION,
        }
        if self.session:
            headers["mcp-session-id"] = self.session
        return headers | extra

    def post(self, body: Any, **headers: str) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = self.client.post("/mcp", content=raw, headers=self.headers(**headers))
        if resp.status_code == 200 and resp.content:
            return 200, resp.json()
        return resp.status_code, resp.content

    def request(self, method: str, params: Any = None, **headers: str) -> tuple[int, Any]:
        self.next_id += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            body["params"] = params
        return self.post(body, **headers)

    def open(self, *, initialized: bool = True, capabilities: dict[str, Any] | None = None) -> None:
        init = {
            "protocolVersion": VERSION,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "a", "version": "1"},
        }
        resp = self.client.post(
            "/mcp", json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}, headers=self.headers()
        )
        assert resp.status_code == 200, resp.text
        self.session = resp.headers["mcp-session-id"]
        if initialized:
            self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[tuple[tuple[TestClient, Settings], tuple[TestClient, Settings]]]:
    """The same gateway twice: with the lean path (a), and with it off (b)."""

    def settings(name: str, fast: bool) -> Settings:
        return Settings(
            data_dir=tmp_path / name,
            audit={"ship": False},
            policy={"engine": "embedded", "reload": False, "decision_log": False},
            server={"fast_path": fast},
        )

    a, b = settings("a", True), settings("b", False)
    with TestClient(create_app(a), base_url=BASE) as lean, TestClient(create_app(b), base_url=BASE) as sdk:
        yield (lean, a), (sdk, b)


def served(client: TestClient) -> int:
    return int(client.app.state.edge.served)  # type: ignore[attr-defined]


SCRIPT: list[tuple[str, Any]] = [
    ("tools/list", None),
    ("tools/list", {}),
    ("tools/call", {"name": "echo", "arguments": {"text": "hi é \u2603"}}),
    ("tools/call", {"name": "echo", "arguments": {"text": "with meta"}, "_meta": {"castellan/run_id": "r-1"}}),
    ("tools/call", {"name": "no.such.tool", "arguments": {}}),
    ("tools/call", {"name": "echo", "arguments": {"wrong": 1}}),
    ("tools/call", {"name": "echo", "arguments": ["not", "an", "object"]}),
    ("tools/call", {"arguments": {}}),
    ("tools/call", {"name": "echo", "arguments": {"text": "p"}, "_meta": {"progressToken": "tok"}}),
    ("tools/call", {"name": "echo", "arguments": {"text": "t"}, "task": {"ttl": 1000}}),
    ("tools/list", {"cursor": 7}),
]


def test_the_lean_path_answers_a_session_as_the_sdk_does(apps: Any) -> None:
    (lean, lean_settings), (sdk, sdk_settings) = apps
    a, b = Agent(lean, lean_settings), Agent(sdk, sdk_settings)
    a.open()
    b.open()
    before = served(lean)
    for method, params in SCRIPT:
        got, want = a.request(method, params), b.request(method, params)
        assert got == want, (method, params)
    assert served(lean) - before >= 6  # the plain lists and calls, refusals included, were served lean
    assert served(sdk) == 0


def test_a_session_error_is_the_sdks_own(apps: Any) -> None:
    (lean, lean_settings), (sdk, sdk_settings) = apps
    a, b = Agent(lean, lean_settings), Agent(sdk, sdk_settings)
    a.open()
    b.open()
    before = served(lean)
    call = {"name": "echo", "arguments": {"text": "x"}}
    cases = [
        {"mcp-session-id": "no-such-session"},  # unknown: 404
        {"accept": "text/event-stream"},  # not acceptable: 406
        {"content-type": "text/plain"},  # unsupported media type: 415
    ]
    for headers in cases:
        assert a.request("tools/call", call, **headers) == b.request("tools/call", call, **headers), headers
    assert a.post(b"{not json") == b.post(b"{not json")
    assert a.post({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}) == b.post(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    )
    # another credential's session is answered as if it did not exist
    other_a, other_b = Agent(lean, lean_settings, "agent-2"), Agent(sdk, sdk_settings, "agent-2")
    other_a.session, other_b.session = a.session, b.session
    assert other_a.request("tools/call", call) == other_b.request("tools/call", call)
    assert other_a.request("tools/call", call)[0] == 404
    assert served(lean) == before


def test_a_session_whose_handshake_is_not_complete_is_the_sdks(apps: Any) -> None:
    (lean, lean_settings), (sdk, sdk_settings) = apps
    a, b = Agent(lean, lean_settings), Agent(sdk, sdk_settings)
    a.open(initialized=False)
    b.open(initialized=False)
    before = served(lean)
    call = {"name": "echo", "arguments": {"text": "early"}}
    assert a.request("tools/call", call) == b.request("tools/call", call)
    assert served(lean) == before


def test_a_client_that_can_be_asked_things_or_set_a_log_level_is_served_by_the_sdk(apps: Any) -> None:
    (lean, lean_settings), _ = apps
    sampling = Agent(lean, lean_settings)
    sampling.open(capabilities={"sampling": {}})
    logging = Agent(lean, lean_settings)
    logging.open()
    assert logging.request("logging/setLevel", {"level": "info"})[0] == 200
    before = served(lean)
    for agent in (sampling, logging):
        status, answer = agent.request("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        assert status == 200
        assert answer["result"]["content"][0]["text"] == "x"
    assert served(lean) == before


def test_a_deleted_session_is_gone_for_the_lean_path_too(apps: Any) -> None:
    (lean, lean_settings), _ = apps
    a = Agent(lean, lean_settings)
    a.open()
    assert a.request("tools/list")[0] == 200
    assert lean.delete("/mcp", headers=a.headers()).status_code == 200
    assert a.request("tools/list")[0] == 404


@pytest.mark.anyio
async def test_a_cancelled_request_is_interrupted_and_answered_cancelled() -> None:
    flights, started = Flights(), asyncio.Event()
    interrupted = False

    async def slow() -> str:
        nonlocal interrupted
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            interrupted = True
            raise
        return "done"

    running = asyncio.ensure_future(flights.run("s1", 5, slow()))
    await started.wait()
    flights.cancel("s2", {"requestId": 5})  # another session's cancellation names another request
    flights.cancel("s1", {"requestId": "5"})  # the SDK correlates a stringified id too
    assert await running == (True, None)
    assert interrupted
    assert await flights.run("s1", 6, asyncio.sleep(0, result="fine")) == (False, "fine")


def test_a_call_served_lean_is_governed_and_recorded_with_the_sessions_client(apps: Any) -> None:
    (lean, lean_settings), _ = apps
    agent = Agent(lean, lean_settings)
    agent.open()
    before = served(lean)
    assert agent.request("tools/call", {"name": "echo", "arguments": {"text": "recorded"}})[0] == 200
    status, refused = agent.request("tools/call", {"name": "no.such.tool", "arguments": {}})
    assert status == 200
    assert refused["result"]["isError"] is True
    assert served(lean) == before + 2
    outbox = lean.app.state.gateway.outbox  # type: ignore[attr-defined]
    decisions = lean.portal.call(outbox.recent, 10)  # type: ignore[attr-defined]
    by_tool = {d["tool"]: d for d in decisions}
    assert by_tool["echo"]["decision"] == "allow"
    assert by_tool["echo"]["arguments"] == {"text": "recorded"}
    assert by_tool["echo"]["client"]["name"] == "a"  # from the session's initialize, as the SDK path records
    assert by_tool["echo"]["agent_id"] == "agent-1"
    assert by_tool["no.such.tool"]["decision"] == "deny"
