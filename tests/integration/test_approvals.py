"""Human approval against real processes: a gateway, a third-party MCP server with a destructive tool,
a webhook receiver, an `mlflow server`, and the `castellan approvals` CLI as an approver runs it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from server.approvals.webhook import SIGNATURE_HEADER, verify_signature
from server.audit.traces import trace_id_for
from tests.gateway_process import GatewayProcess, free_port, run_gateway
from tests.gateway_process import run_cli as gateway_cli
from tests.integration.conftest import deny_body, raw_call
from tests.integration.test_upstream_servers import listed, upstream
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
SECRET = "approval-webhook-test-secret-0123"
APPROVE = ("castellan:approve",)


def policies_with(tmp_path: Path, tools: dict[str, Any]) -> Path:
    """The default policy, with `tools` added to its per-tool config (as a team would edit data.json)."""
    target = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, target)
    data_file = target / "castellan" / "config" / "data.json"
    data = json.loads(data_file.read_text())
    data["tools"].update(tools)
    data_file.write_text(json.dumps(data))
    return target


def run_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`castellan ARGS` beside the gateway (a start-up of the CLI takes tens of seconds on a loaded machine)."""
    return gateway_cli(gw, *args, timeout=180)


def approvals_cli(gw: GatewayProcess, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`castellan approvals ARGS` as an approver runs it, with their token in $CASTELLAN_TOKEN."""
    return gateway_cli(gw, "approvals", *args, timeout=180, env={"CASTELLAN_TOKEN": token})


async def pending(gw: GatewayProcess, token: str, count: int) -> list[dict[str, Any]]:
    """The pending requests, through the CLI, once there are `count` (bounded wait)."""
    deadline = time.monotonic() + 30
    while True:
        done = await asyncio.to_thread(approvals_cli, gw, token, "list", "--json")
        assert done.returncode == 0, done.stderr
        found: list[dict[str, Any]] = json.loads(done.stdout)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.3)


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, Any], bool]]]]:
    """A real HTTP listener on loopback: records each delivery and whether its signature is valid.
    Fails the first delivery with a 503, so the gateway's retry is exercised."""
    received: list[tuple[dict[str, Any], bool]] = []
    attempts = [0]

    async def hook(request: web.Request) -> web.Response:
        attempts[0] += 1
        if attempts[0] == 1:
            return web.Response(status=503)
        body = await request.read()
        received.append((json.loads(body), verify_signature(SECRET.encode(), request.headers[SIGNATURE_HEADER], body)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


@contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """`mlflow server`, given the time it takes on a loaded 2-core machine (110 s seen at load 14)."""
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root, free_port())
    try:
        server.start(timeout=300)
        yield server
    finally:
        server.stop()


def approval_span(tracking_uri: str, call_id: str, seconds: float = 120) -> dict[str, Any]:
    """The `approval` span of the call's trace in MLflow, once shipped (bounded wait)."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient(tracking_uri)
    deadline = time.monotonic() + seconds
    while True:
        try:
            trace = client.get_trace(trace_id_for(call_id))
            spans = {s.name: s for s in trace.data.spans}
            if "approval" in spans and "tool" in spans:
                return {"outputs": spans["approval"].outputs, "type": spans["approval"].span_type}
        except Exception:  # not shipped yet
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.mark.timeout(900)
async def test_a_destructive_call_by_an_analyst_waits_and_runs_once_when_an_admin_approves_it(
    tmp_path: Path,
) -> None:
    upstream_port = free_port()
    policies = policies_with(
        tmp_path,
        {"inventory.discontinue": {"approval": {"groups": ["admins"], "reason": "discontinuing cannot be undone"}}},
    )
    os.environ["UPSTREAM_DESTRUCTIVE"] = "1"
    try:
        stack = upstream(upstream_port, "Units in stock for a product.")
        stack.__enter__()
    finally:
        del os.environ["UPSTREAM_DESTRUCTIVE"]
    try:
        async with webhook_receiver() as (hook_url, received):
            with mlflow_server(tmp_path / "mlflow") as mlflow:
                env = {
                    "CASTELLAN_UPSTREAMS": json.dumps(
                        [{"name": "inventory", "url": f"http://127.0.0.1:{upstream_port}/mcp"}]
                    ),
                    "CASTELLAN_POLICY__PATH": str(policies),
                    "CASTELLAN_GRANTS__CACHE_TTL_SECONDS": "0",
                    "CASTELLAN_TOOLS__UPSTREAM_REFRESH_SECONDS": "1",
                    "CASTELLAN_APPROVALS__TIMEOUT_SECONDS": "90",
                    "CASTELLAN_APPROVALS__WEBHOOK_URL": hook_url,
                    "CASTELLAN_APPROVALS__WEBHOOK_SECRET": SECRET,
                    "CASTELLAN_APPROVALS__APPROVAL_PAGE_URL": "https://console.example/approvals/{id}",
                    "CASTELLAN_AUDIT__SHIP": "true",
                    "CASTELLAN_AUDIT__MLFLOW_TRACKING_URI": mlflow.url,
                    "CASTELLAN_AUDIT__SHIP_INTERVAL_SECONDS": "0.2",
                    "MLFLOW_DISABLE_TELEMETRY": "true",
                }
                with run_gateway(tmp_path / "gw", env, timeout=240) as gw:
                    await _approval_story(gw, received, mlflow.url)
    finally:
        stack.__exit__(None, None, None)


async def _approval_story(gw: GatewayProcess, received: list[tuple[dict[str, Any], bool]], tracking_uri: str) -> None:
    for statement in ("USE SCHEMA ON SCHEMA main.upstream", "EXECUTE ON SCHEMA main.upstream"):
        done = run_cli(gw, "grants", "grant", *statement.split(), "TO", "analysts")
        assert done.returncode == 0, done.stderr
    analyst = gw.token("stock-bot", ["analysts"], subject="alice")
    approver = gw.token("ops-console", ["admins"], subject="bob", scopes=APPROVE)
    alice_as_admin = gw.token("alice-laptop", ["admins"], subject="alice", scopes=APPROVE)
    admin = gw.token("ops-bot", ["admins"], subject="ops")

    deadline = time.monotonic() + 60
    while "inventory.discontinue" not in await listed(gw, admin) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.3)

    first = asyncio.create_task(raw_call(gw, analyst, "inventory.discontinue", {"product": "gadget"}))
    (request,) = await pending(gw, approver, 1)
    assert request["tool"] == "inventory.discontinue"
    assert request["arguments"] == {"product": "gadget"}
    assert request["caller"]["subject"] == "alice"
    assert request["approvers"] == ["admins"]
    assert "discontinuing cannot be undone" in request["summary"]
    assert "destructive" in request["summary"]
    assert not first.done()  # the call waits

    # The caller's own user, though an admin with the approve scope, cannot approve it.
    refused = await asyncio.to_thread(approvals_cli, gw, alice_as_admin, "approve", request["id"])
    assert refused.returncode != 0
    assert "403: an approver can never approve their own call" in refused.stderr
    # Nor can a token without the approve scope.
    unscoped = await asyncio.to_thread(approvals_cli, gw, admin, "approve", request["id"])
    assert "403" in unscoped.stderr
    assert "castellan:approve" in unscoped.stderr

    # The same tool with other arguments is another request: the approval below does not cover it.
    second = asyncio.create_task(raw_call(gw, analyst, "inventory.discontinue", {"product": "gizmo"}))
    both = await pending(gw, approver, 2)
    other = next(r for r in both if r["id"] != request["id"])
    assert other["arguments"] == {"product": "gizmo"}
    assert other["arguments_sha256"] != request["arguments_sha256"]

    shown = await asyncio.to_thread(approvals_cli, gw, approver, "show", request["id"])
    assert shown.returncode == 0
    assert "Agent stock-bot for alice" in shown.stdout
    done = await asyncio.to_thread(approvals_cli, gw, approver, "approve", request["id"], "--comment", "end of line")
    assert done.returncode == 0, done.stderr
    result = await asyncio.wait_for(first, 30)
    assert not result.get("isError"), result
    assert result["structuredContent"] == {"discontinued": "gadget", "runs": 1, "so_far": ["gadget"]}

    await asyncio.sleep(1.0)
    assert not second.done()  # still waiting: not covered by the approval of the first
    again = await asyncio.to_thread(approvals_cli, gw, approver, "approve", request["id"])
    assert "409" in again.stderr  # used: one approval, one run
    denied = await asyncio.to_thread(approvals_cli, gw, approver, "deny", other["id"], "--comment", "keep gizmo")
    assert denied.returncode == 0, denied.stderr
    body = deny_body(await asyncio.wait_for(second, 30))
    assert body["stage"] == "approval"
    assert body["reasons"] == ["approval denied by bob: keep gizmo"]

    # An admin calls it directly; the upstream says it has run twice: the approved call ran once, the
    # refused one never.
    direct = await raw_call(gw, admin, "inventory.discontinue", {"product": "widget"})
    assert direct["structuredContent"]["so_far"] == ["gadget", "widget"]  # type: ignore[index]

    # The audit record of the approved call: who approved, when, and the summary they were shown.
    record = json.loads(run_cli(gw, "audit", "show", request["call_id"]).stdout)
    approval = record["decision"]["approval"]
    assert approval["status"] == "approved"
    assert approval["decided_by"]["subject"] == "bob"
    assert approval["summary"] == request["summary"]
    assert approval["comment"] == "end of line"
    assert record["decision"]["obligations"]["require_approval"]["groups"] == ["admins"]
    refusal = json.loads(run_cli(gw, "audit", "show", other["call_id"]).stdout)["decision"]
    assert refusal["decision"] == "deny"
    assert refusal["approval"]["status"] == "denied"

    # The webhook: every request and decision, each validly signed (after a retry of the first).
    deadline = time.monotonic() + 20
    while len(received) < 4 and time.monotonic() < deadline:  # noqa: ASYNC110 - another process posts
        await asyncio.sleep(0.2)
    events = [(body["event"], body["approval"]["id"], valid) for body, valid in received]
    assert sorted(events) == sorted(
        [
            ("approval.requested", request["id"], True),
            ("approval.requested", other["id"], True),
            ("approval.decided", request["id"], True),
            ("approval.decided", other["id"], True),
        ]
    )
    requested = next(
        b for b, _ in received if b["event"] == "approval.requested" and b["approval"]["id"] == request["id"]
    )
    assert requested["approval_url"] == f"https://console.example/approvals/{request['id']}"

    # The call's MLflow trace has the approval as a span, with who approved it.
    span = await asyncio.to_thread(approval_span, tracking_uri, request["call_id"])
    assert span["type"] == "GUARDRAIL"
    assert span["outputs"]["status"] == "approved"
    assert span["outputs"]["decided_by"]["subject"] == "bob"


async def test_a_call_nobody_approves_in_time_is_denied_and_recorded(tmp_path: Path) -> None:
    policies = policies_with(tmp_path, {"echo": {"approval": {"groups": ["admins"], "timeout_seconds": 1}}})
    with run_gateway(tmp_path / "gw", {"CASTELLAN_POLICY__PATH": str(policies)}, timeout=180) as gw:
        analyst = gw.token("echo-bot", ["analysts"])
        started = time.monotonic()
        body = deny_body(await raw_call(gw, analyst, "echo", {"text": "hello"}))
        assert time.monotonic() - started >= 1.0
        assert body["stage"] == "approval"
        (reason,) = body["reasons"]
        assert reason.startswith("no approver decided within")
        approver = gw.token("ops-console", ["admins"], subject="bob", scopes=APPROVE)
        listed = approvals_cli(gw, approver, "list", "--status", "expired", "--json")
        (expired,) = json.loads(listed.stdout)
        assert expired["tool"] == "echo"
        assert expired["status"] == "expired"
        late = approvals_cli(gw, approver, "approve", expired["id"])
        assert "409" in late.stderr
        assert "expired, not pending" in late.stderr
        record = json.loads(run_cli(gw, "audit", "show", expired["call_id"]).stdout)["decision"]
        assert record["decision"] == "deny"
        assert record["stage"] == "approval"
        assert record["approval"]["status"] == "expired"
        assert record["approval"]["decided_by"] is None
        # An admin (an approver) is not asked.
        admin = gw.token("ops-bot", ["admins"])
        assert not (await raw_call(gw, admin, "echo", {"text": "hi"})).get("isError")
