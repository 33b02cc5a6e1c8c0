"""In-band approval against real processes: a gateway (`castellan serve`) whose policy asks an admin to
approve `echo`, the official Python client as the agent (its elicitation callback is the agent's
user), in both protocol eras, and the `castellan approvals` CLI as an approver runs it.

The user is told by elicitation what their call waits for; their decline withdraws it, their accept
only keeps it waiting for an approver (it is their own call); a client without elicitation waits out
of band as before."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import raw_call
from tests.integration.test_approvals import APPROVE, approvals_cli, policies_with, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
MODES = ["legacy", "2026-07-28"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("inband")
    policies = policies_with(root, {"echo": {"approval": {"groups": ["admins"], "reason": "echoes are loud"}}})
    env = {"CASTELLAN_POLICY__PATH": str(policies), "CASTELLAN_APPROVALS__TIMEOUT_SECONDS": "120"}
    with run_gateway(root / "gw", env, timeout=240) as gw:  # a loaded 2-core machine starts it slowly
        yield gw


class User:
    """The agent's user: answers every elicitation with `action`, and remembers what it was shown."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.shown: list[dict[str, Any]] = []

    async def elicitation(self, ctx: Any, params: Any) -> types.ElicitResult:
        self.shown.append(params.model_dump(by_alias=True, mode="json", exclude_none=True))
        return types.ElicitResult(action=self.action)  # type: ignore[arg-type]


def connect(gw: GatewayProcess, user: User, mode: str) -> Client:
    token = gw.token("echo-bot", ["analysts"], subject="alice")
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=180)
    return Client(
        streamable_http_client(gw.mcp_url, http_client=http),
        mode=mode,  # type: ignore[arg-type]
        elicitation_callback=user.elicitation,
    )


async def requests(gw: GatewayProcess, status: str, text: str) -> list[dict[str, Any]]:
    """The approval requests in `status` for an echo of `text`, through the admin API (bounded wait)."""
    headers = {"Authorization": f"Bearer {gw.token('ops-console', ['admins'], subject='bob', scopes=APPROVE)}"}
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        while True:
            found = (await http.get(f"{gw.base_url}/admin/approvals", params={"status": status})).json()
            mine = [r for r in found["approvals"] if r["arguments"].get("text") == text]
            if mine or time.monotonic() > deadline:
                return mine
            await asyncio.sleep(0.3)


def decision_of(gw: GatewayProcess, call_id: str) -> dict[str, Any]:
    done = run_cli(gw, "audit", "show", call_id)
    assert done.returncode == 0, done.stderr
    decision: dict[str, Any] = json.loads(done.stdout)["decision"]
    return decision


def text_of(result: types.CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


@pytest.mark.parametrize("mode", MODES)
async def test_the_users_decline_withdraws_the_waiting_call(gateway: GatewayProcess, mode: str) -> None:
    user = User("decline")
    text = f"withdraw me ({mode})"
    async with connect(gateway, user, mode) as client:
        result = await asyncio.wait_for(client.call_tool("echo", {"text": text}), 150)
    assert result.is_error
    body = json.loads(text_of(result))
    assert body["stage"] == "approval"
    (reason,) = body["reasons"]
    assert "withdrawn by the agent's user (decline)" in reason

    # The user saw the call summarised: what it does, with which arguments, why, and who may approve;
    # the official client takes URL elicitation, so they are also pointed at the console's approval page.
    (request,) = await requests(gateway, "denied", text)
    (shown,) = user.shown
    assert shown["mode"] == "url"
    assert shown["url"] == f"{gateway.base_url}/console/approvals/{request['id']}"
    assert "asks to call echo" in shown["message"]
    assert text in shown["message"]
    assert "echoes are loud" in shown["message"]
    assert "approval by admins" in shown["message"]

    assert request["decided_by"]["agent_id"] == "echo-bot"  # the caller withdrew it; no approver decided
    decision = decision_of(gateway, request["call_id"])
    assert decision["decision"] == "deny"
    assert decision["approval"]["status"] == "denied"
    assert decision["approval"]["in_band"]["action"] == "decline"
    assert decision["approval"]["in_band"]["message"] == shown["message"]


@pytest.mark.parametrize("mode", MODES)
async def test_the_users_accept_keeps_the_call_waiting_until_an_approver_approves(
    gateway: GatewayProcess, mode: str
) -> None:
    user = User("accept")
    text = f"approve me ({mode})"
    async with connect(gateway, user, mode) as client:
        call = asyncio.create_task(client.call_tool("echo", {"text": text}))
        (request,) = await requests(gateway, "pending", text)
        deadline = time.monotonic() + 60
        while not user.shown and time.monotonic() < deadline:  # noqa: ASYNC110 - the gateway asks
            await asyncio.sleep(0.2)
        assert user.shown, "the user was not asked"
        await asyncio.sleep(0.5)
        assert not call.done()  # the user's accept approves nothing: it is their own call
        approver = gateway.token("ops-console", ["admins"], subject="bob", scopes=APPROVE)
        done = await asyncio.to_thread(approvals_cli, gateway, approver, "approve", request["id"])
        assert done.returncode == 0, done.stderr
        result = await asyncio.wait_for(call, 120)
    assert not result.is_error, result
    assert text in text_of(result)
    assert len(user.shown) == 1  # asked once, ran once
    (used,) = await requests(gateway, "used", text)
    assert used["used_by"] == request["call_id"]
    decision = decision_of(gateway, request["call_id"])
    assert decision["approval"]["status"] == "approved"
    assert decision["approval"]["decided_by"]["subject"] == "bob"
    assert decision["approval"]["in_band"]["action"] == "accept"


async def test_a_client_without_elicitation_is_approved_out_of_band(gateway: GatewayProcess) -> None:
    text = "no elicitation here"
    token = gateway.token("echo-bot", ["analysts"], subject="alice")
    call = asyncio.create_task(raw_call(gateway, token, "echo", {"text": text}))
    (request,) = await requests(gateway, "pending", text)
    approver = gateway.token("ops-console", ["admins"], subject="bob", scopes=APPROVE)
    done = await asyncio.to_thread(approvals_cli, gateway, approver, "approve", request["id"])
    assert done.returncode == 0, done.stderr
    result = await asyncio.wait_for(call, 120)
    assert not result.get("isError"), result
    decision = decision_of(gateway, request["call_id"])
    assert decision["approval"]["status"] == "approved"
    assert "in_band" not in decision["approval"]
