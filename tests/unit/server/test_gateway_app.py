"""`/mcp` dispatched at the top of the app answers every request byte for byte as the full FastAPI stack
answers it (status, every header, body), in both protocol eras and on every error path; other routes
are the FastAPI app's, unchanged."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from server.app import create_app
from server.auth.devkeys import mint_dev_token
from server.gateway_app import GatewayApp
from server.settings import Settings

BASE = "http://127.0.0.1:8750"
MODERN = "2026-07-28"
SESSION = "2025-11-25"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "diff", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
JSON_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


class Counted:
    """The `/mcp` endpoint, counting the requests the top-level dispatch handed it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await self.app(scope, receive, send)


class Switch:
    """The app (its lifespan, and requests while `full` is off) or its FastAPI stack (while it is on), on
    one event loop."""

    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        self.full = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.full and scope["type"] == "http":
            await self.app.full_stack(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Rig:
    """One gateway app, reached two ways: the app itself, and its FastAPI stack (`full`)."""

    def __init__(self, app: GatewayApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        assert app.mcp is not None
        self.counted = Counted(app.mcp)
        app.mcp = self.counted
        self.switch = Switch(app)
        self.client = TestClient(self.switch, base_url=BASE, raise_server_exceptions=False, follow_redirects=False)
        self.token = self.mint("diff-agent")
        self.ids = 0

    def mint(self, agent: str, audience: str | None = None) -> str:
        return mint_dev_token(
            self.settings.data_dir,
            agent=agent,
            issuer=self.settings.issuer,
            audience=audience or self.settings.resource_url,
            groups=["analysts"],
        )

    def both(
        self, method: str, path: str = "/mcp", body: Any = None, *, token: str | None = "", **headers: str
    ) -> tuple[Any, Any]:
        """The same request through each path: (status, headers, body) of each, and checks which path
        answered (only the lean one reaches the endpoint through the top-level dispatch)."""
        self.ids += 1
        request_headers = {"x-request-id": f"diff-{self.ids}", **headers}
        if token is not None:
            request_headers["authorization"] = f"Bearer {token or self.token}"
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        before = self.counted.calls
        lean = answer(self.client.request(method, path, content=content, headers=request_headers))
        dispatched = self.counted.calls - before
        self.switch.full = True
        try:
            full = answer(self.client.request(method, path, content=content, headers=request_headers))
        finally:
            self.switch.full = False
        assert self.counted.calls - before == dispatched, "the full stack reached the endpoint by the dispatch"
        self.last_dispatched = dispatched
        return lean, full


def answer(resp: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    # a new session's id differs between two sessions; that there is one, and where, is compared
    headers = [(k, "<session>" if k == "mcp-session-id" else v) for k, v in resp.headers.multi_items()]
    return resp.status_code, headers, resp.content


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False},
        policy={"engine": "embedded", "reload": False, "decision_log": False},
        server={"max_body_bytes": 4096},
    )
    app = create_app(settings)
    rig = Rig(app, settings)
    with rig.client:  # starts the gateway (the lifespan) once; both paths serve the same gateway
        yield rig


def modern(method: str, params: dict[str, Any], request_id: int = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": ENVELOPE}}


def modern_headers(method: str, name: str | None = None) -> dict[str, str]:
    extra = {"mcp-name": name} if name else {}
    return {**JSON_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": method, **extra}


def open_session(rig: Rig) -> str:
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": SESSION, "capabilities": {}, "clientInfo": {"name": "d", "version": "1"}},
    }
    headers = {**JSON_HEADERS, "authorization": f"Bearer {rig.token}"}
    resp = rig.client.post("/mcp", json=init, headers=headers)
    assert resp.status_code == 200, resp.text
    session = str(resp.headers["mcp-session-id"])
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    ack = rig.client.post(
        "/mcp", json=note, headers={**headers, "mcp-session-id": session, "mcp-protocol-version": SESSION}
    )
    assert ack.status_code == 202, ack.text
    return session


MODERN_CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("tools/call", modern("tools/call", {"name": "echo", "arguments": {"text": "hi"}}), {"name": "echo"}),
    ("tools/list", modern("tools/list", {}), {}),
    ("unknown tool", modern("tools/call", {"name": "no.such.tool", "arguments": {}}), {"name": "no.such.tool"}),
    ("bad arguments", modern("tools/call", {"name": "echo", "arguments": {"text": 5}}), {"name": "echo"}),
    ("another method", modern("resources/list", {}), {}),
    ("malformed JSON", b'{"jsonrpc": "2.0", "id": 1, "method": ', {}),
    ("not JSON-RPC", [1, 2, 3], {}),
    ("a notification", {"jsonrpc": "2.0", "method": "notifications/initialized", "params": {"_meta": ENVELOPE}}, {}),
]


@pytest.mark.parametrize(("case", "body", "extra"), MODERN_CASES, ids=[c[0] for c in MODERN_CASES])
def test_a_2026_request_is_answered_as_the_full_stack_answers_it(
    rig: Rig, case: str, body: Any, extra: dict[str, str]
) -> None:
    method = body["method"] if isinstance(body, dict) and "method" in body else "tools/call"
    lean, full = rig.both("POST", body=body, **modern_headers(method, extra.get("name")))
    assert lean == full
    assert rig.last_dispatched == 1
    assert ("x-request-id", f"diff-{rig.ids}") in lean[1]


def test_a_2026_call_through_either_path_gives_the_tool_result(rig: Rig) -> None:
    lean, _ = rig.both("POST", body=MODERN_CASES[0][1], **modern_headers("tools/call", "echo"))
    status, headers, body = lean
    assert status == 200
    assert dict(headers)["content-type"] == "application/json"
    assert json.loads(body)["result"]["isError"] is False


SESSION_CASES: list[tuple[str, Any]] = [
    (
        "tools/call",
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}},
    ),
    ("tools/list", {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
    ("ping", {"jsonrpc": "2.0", "id": 5, "method": "ping"}),
    ("unknown tool", {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "nope", "arguments": {}}}),
    ("malformed JSON", b"{not json"),
    ("a response from the client", {"jsonrpc": "2.0", "id": 9, "result": {}}),
]


@pytest.mark.parametrize(("case", "body"), SESSION_CASES, ids=[c[0] for c in SESSION_CASES])
def test_a_2025_session_request_is_answered_as_the_full_stack_answers_it(rig: Rig, case: str, body: Any) -> None:
    session = open_session(rig)
    lean, full = rig.both(
        "POST", body=body, **JSON_HEADERS, **{"mcp-session-id": session, "mcp-protocol-version": SESSION}
    )
    assert lean == full
    assert rig.last_dispatched == 1


def test_an_unknown_or_missing_session_is_refused_alike(rig: Rig) -> None:
    call = SESSION_CASES[0][1]
    for session in ({"mcp-session-id": "0" * 32}, {}):
        lean, full = rig.both("POST", body=call, **JSON_HEADERS, **session, **{"mcp-protocol-version": SESSION})
        assert lean == full
        assert lean[0] in (400, 404)


def test_a_session_of_another_credential_is_refused_alike(rig: Rig) -> None:
    session = open_session(rig)
    other = rig.mint("someone-else")
    headers = {**JSON_HEADERS, "mcp-session-id": session, "mcp-protocol-version": SESSION}
    lean, full = rig.both("POST", body=SESSION_CASES[1][1], token=other, **headers)
    assert lean == full
    assert lean[0] == 404


def test_initialize_is_answered_alike(rig: Rig) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": SESSION, "capabilities": {}, "clientInfo": {"name": "d", "version": "1"}},
    }
    lean, full = rig.both("POST", body=init, **JSON_HEADERS)
    assert lean == full
    assert ("mcp-session-id", "<session>") in lean[1]


EDGE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("no token", {"token": None}),
    ("an invalid token", {"token": "not-a-jwt"}),
    ("a non-Bearer scheme", {"token": None, "authorization": "Basic dXNlcjpwYXNz"}),
    ("a foreign Host", {"host": "evil.example:8750"}),
    ("a foreign Origin", {"origin": "https://evil.example"}),
    ("a loopback Origin", {"origin": "http://localhost:3000"}),
    ("an oversized body", {"body": b"x" * 5000}),
    ("a wrong content type", {"content-type": "text/plain"}),
    ("no Accept", {"accept": "text/html"}),
]


@pytest.mark.parametrize(("case", "change"), EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_a_request_refused_at_the_edge_is_refused_alike(rig: Rig, case: str, change: dict[str, Any]) -> None:
    change = dict(change)
    body = change.pop("body", MODERN_CASES[0][1])
    token = change.pop("token", "")
    headers = {**modern_headers("tools/call", "echo"), **change}
    lean, full = rig.both("POST", body=body, token=token, **headers)
    assert lean == full
    assert rig.last_dispatched == 1


def test_401_names_the_resource_metadata_on_both_paths(rig: Rig) -> None:
    lean, full = rig.both("POST", body=MODERN_CASES[0][1], token=None, **modern_headers("tools/call", "echo"))
    assert lean == full
    assert lean[0] == 401
    assert dict(lean[1])["www-authenticate"].startswith('Bearer resource_metadata="')


def test_get_and_delete_on_mcp_are_answered_alike(rig: Rig) -> None:
    for method, headers in (
        ("GET", {"accept": "application/json"}),  # no event stream accepted: 406
        ("GET", {"accept": "text/event-stream"}),  # no session: 400
        ("GET", {"accept": "text/event-stream", "mcp-session-id": "0" * 32, "mcp-protocol-version": SESSION}),
        ("DELETE", {"mcp-session-id": "0" * 32, "mcp-protocol-version": SESSION}),
        ("DELETE", {}),
        ("GET", {"accept": "text/event-stream", "mcp-protocol-version": MODERN}),
    ):
        lean, full = rig.both(method, **headers)
        assert lean == full, (method, headers)
        assert rig.last_dispatched == 1


def test_deleting_a_session_is_answered_alike(rig: Rig) -> None:
    answers = []
    for full in (False, True):
        session = open_session(rig)
        headers = {"authorization": f"Bearer {rig.token}", "mcp-session-id": session, "mcp-protocol-version": SESSION}
        rig.switch.full = full
        resp = rig.client.delete("/mcp", headers={**headers, "x-request-id": "del"})
        answers.append(answer(resp))
        again = rig.client.post(
            "/mcp", json=SESSION_CASES[1][1], headers={**JSON_HEADERS, **headers, "x-request-id": "a"}
        )
        answers.append(answer(again))
        rig.switch.full = False
    assert answers[0] == answers[2]
    assert answers[1] == answers[3]
    assert answers[1][0] == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/.well-known/oauth-protected-resource/mcp"),
        ("GET", "/no/such/route"),
        ("POST", "/mcp/"),  # the router's slash redirect
        ("PUT", "/mcp"),  # the route's 405
        ("HEAD", "/mcp"),
    ],
)
def test_other_routes_and_methods_are_the_full_stacks(rig: Rig, method: str, path: str) -> None:
    lean, full = rig.both(method, path)
    assert lean == full
    assert rig.last_dispatched == 0


def test_an_unhandled_exception_is_a_500_as_from_the_full_stack(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(type(rig.app.state.edge), "__call__", lambda self, s, r, se: broken(s, r, se))
    lean, full = rig.both("POST", body=MODERN_CASES[0][1], **modern_headers("tools/call", "echo"))
    assert lean == full
    assert lean[0] == 500
    assert json.loads(lean[2]) == {"error": "internal error", "request_id": f"diff-{rig.ids}"}


def test_a_request_without_a_sane_request_id_gets_a_fresh_uuid_on_both_paths(rig: Rig) -> None:
    for given in ({}, {"x-request-id": "no spaces allowed"}):
        ids = []
        for full in (False, True):
            rig.switch.full = full
            resp = rig.client.get("/mcp", headers={"authorization": f"Bearer {rig.token}", **given})
            rig.switch.full = False
            ids.append(uuid.UUID(resp.headers["x-request-id"]))
        assert all(i.version == 4 and i.hex == str(i).replace("-", "") for i in ids)
        assert ids[0] != ids[1]
