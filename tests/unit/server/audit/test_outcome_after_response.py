"""Through the real app: a governed call's response leaves before its outcome record is built and its
decision-log line written (both off the response path), and both are there once the call is answered:
the outcome in the outbox by its group commit, the line by shutdown."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from server.app import create_app
from server.auth.devkeys import mint_dev_token
from server.gateway import Gateway
from server.gateway_app import GatewayApp
from server.policy.decision_log import DecisionLog
from server.settings import Settings
from tests.mcp_wire import ENVELOPE, HEADERS, MODERN, open_session


class Watched:
    """The app, noting (in `events`) when a response body is sent."""

    def __init__(self, app: GatewayApp, events: list[str]) -> None:
        self.app = app
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def noting(message: Message) -> None:
            if message["type"] == "http.response.body" and scope["type"] == "http":
                self.events.append("response")
            await send(message)

        await self.app(scope, receive, noting)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[TestClient, Gateway, list[str], str]]:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False, "outcome_commit_seconds": 0.05},
        policy={"engine": "embedded", "reload": False, "decision_log": True},
    )
    app = create_app(settings)
    gateway: Gateway = app.state.gateway
    events: list[str] = []
    write_later = gateway.outbox.write_later

    def noted(kind: Any, call_id: str, record: dict[str, Any]) -> None:
        events.append(kind)
        write_later(kind, call_id, record)

    gateway.outbox.write_later = noted  # type: ignore[method-assign]
    assert gateway.decision_log is not None
    log: DecisionLog = gateway.decision_log
    emit = log._emit

    def logged(*args: Any) -> None:
        events.append("decision_log")
        emit(*args)

    log._emit = logged  # type: ignore[method-assign, assignment]
    token = mint_dev_token(
        settings.data_dir, agent="after", issuer=settings.issuer, audience=settings.resource_url, groups=["analysts"]
    )
    with TestClient(Watched(app, events), base_url="http://127.0.0.1:8750") as client:
        yield client, gateway, events, token


def committed_outcomes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'outcome'").fetchone()[0])


def _wait_for_an_outcome(gateway: Gateway) -> None:
    """Until an outcome is committed, or 2 s: the outcome's group commit is 0.05 s away."""
    for _ in range(200):
        if committed_outcomes(gateway.outbox.path) >= 1:  # type: ignore[attr-defined]
            return
        time.sleep(0.01)


def test_a_2026_call_is_answered_before_its_outcome_and_decision_log_line_are_built(
    rig: tuple[TestClient, Gateway, list[str], str],
) -> None:
    client, gateway, events, token = rig
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": ENVELOPE},
    }
    headers = {**HEADERS, "authorization": f"Bearer {token}", "mcp-protocol-version": MODERN}
    resp = client.post("/mcp", json=body, headers={**headers, "mcp-method": "tools/call", "mcp-name": "echo"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["result"]["isError"] is False
    _wait_for_an_outcome(gateway)
    # the answer first, then what it left
    assert (events[0], sorted(events[1:3])) == ("response", ["decision_log", "outcome"])


def test_a_call_on_a_2025_session_is_answered_before_its_outcome_and_decision_log_line_are_built(
    rig: tuple[TestClient, Gateway, list[str], str],
) -> None:
    client, gateway, events, token = rig
    headers = {**HEADERS, "authorization": f"Bearer {token}"}
    session = open_session(client, headers)
    events.clear()
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}
    resp = client.post("/mcp", json=call, headers=session)
    assert resp.status_code == 200, resp.text
    assert resp.json()["result"]["isError"] is False
    _wait_for_an_outcome(gateway)
    # the request runs in a task of its own there: the edge says when its response is out
    assert (events[0], sorted(events[1:3])) == ("response", ["decision_log", "outcome"])


def test_the_decision_log_line_of_an_answered_call_is_written_by_shutdown(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False},
        policy={"engine": "embedded", "reload": False, "decision_log": True, "decision_log_flush_seconds": 3600},
    )
    app = create_app(settings)
    token = mint_dev_token(
        settings.data_dir, agent="after", issuer=settings.issuer, audience=settings.resource_url, groups=["analysts"]
    )
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": ENVELOPE},
    }
    headers = {**HEADERS, "authorization": f"Bearer {token}", "mcp-protocol-version": MODERN}
    with TestClient(app, base_url="http://127.0.0.1:8750") as client:
        resp = client.post("/mcp", json=body, headers={**headers, "mcp-method": "tools/call", "mcp-name": "echo"})
        assert resp.status_code == 200, resp.text
    lines = [json.loads(line) for line in (settings.data_dir / "decisions.jsonl").read_text().splitlines()]
    assert [(e["input"]["tool"]["name"], e["result"]["allow"]) for e in lines] == [("echo", True)]
    with sqlite3.connect(settings.data_dir / "audit.db") as db:
        kinds = sorted(k for (k,) in db.execute("SELECT kind FROM outbox"))
    assert kinds == ["decision", "outcome"]
