"""Long-running calls as tasks (the `io.modelcontextprotocol/tasks` extension, 2026-07-28) through a real
gateway: the official Python client's task-augmented call (a `ClientExtension` whose result claim polls
`tasks/get`), a task only its starter (same subject and agent) can see or cancel, a task that asks the
agent something and is answered through `tasks/update`, and the audit trail of each.

Real processes: the gateway (`castellan serve`) and an `mcp` SDK upstream (tests/fixtures/conformance_server.py,
whose tasks fixtures are tests/fixtures/conformance_tasks.py); the agents are the official Python client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import httpx2 as httpx
import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.audit_trail import outcomes_committed, settled_audit
from tests.gateway_process import GatewayProcess, run_gateway
from tests.mcp_upstream import conformance_upstream

pytestmark = pytest.mark.integration
MODERN = "2026-07-28"
TASKS = "io.modelcontextprotocol/tasks"


class TaskParams(types.RequestParams):
    task_id: str


class UpdateParams(TaskParams):
    input_responses: dict[str, Any]


class GetTask(types.Request[TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskParams
    name_param: ClassVar[str | None] = "taskId"  # SEP-2663: Mcp-Name carries the task id


class CancelTask(types.Request[TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskParams
    name_param: ClassVar[str | None] = "taskId"


class UpdateTask(types.Request[UpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    params: UpdateParams
    name_param: ClassVar[str | None] = "taskId"


class CreateTaskResult(types.Result):
    result_type: Literal["task"] = "task"  # type: ignore[assignment]
    task_id: str
    status: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class DetailedTask(types.Result):
    task_id: str
    status: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    input_requests: dict[str, Any] | None = None


async def get_task(session: ClientSession, task_id: str) -> DetailedTask:
    return await session.send_request(GetTask(params=TaskParams(task_id=task_id)), DetailedTask)


async def until(session: ClientSession, task_id: str, *statuses: str) -> DetailedTask:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = await get_task(session, task_id)
        if task.status in (*statuses, "completed", "failed", "cancelled"):
            return task
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not reach {statuses}")


class Tasks(ClientExtension):
    """The tasks extension for the SDK client: a `CreateTaskResult` is polled until it ends, and its
    inlined result is the call's result."""

    identifier = TASKS

    def __init__(self) -> None:
        self.created: list[CreateTaskResult] = []

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=self.resolve)]

    async def resolve(self, created: CreateTaskResult, ctx: ClaimContext) -> types.CallToolResult:
        self.created.append(created)
        task = await until(ctx.session, created.task_id)
        if task.status != "completed" or task.result is None:
            raise RuntimeError(f"task {task.task_id} ended {task.status}: {task.error}")
        return types.CallToolResult.model_validate(task.result)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("tasks")
    with conformance_upstream() as url:
        upstreams = [{"name": "fixture", "url": url, "prefix": ""}]
        # every call to a tool that supports tasks becomes one (no immediate-result window)
        env = {"CASTELLAN_UPSTREAMS": json.dumps(upstreams), "CASTELLAN_TASKS__PROMOTE_AFTER_SECONDS": "0"}
        with run_gateway(root / "gw", env, timeout=120) as gw:
            yield gw


async def never_asked(ctx: Any, params: Any) -> types.ElicitResult:
    raise AssertionError("a task's questions come through tasks/get, not as input rounds of the call")


def connect(
    gw: GatewayProcess, agent: str, *extensions: ClientExtension, subject: str | None = None, elicits: bool = False
) -> Client:
    token = gw.token(agent, ["admins"], subject=subject) if subject else gw.token(agent, ["admins"])
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(
        streamable_http_client(gw.mcp_url, http_client=http),
        mode=MODERN,
        extensions=list(extensions),
        elicitation_callback=never_asked if elicits else None,
    )


def audit(gw: GatewayProcess, *args: str) -> list[dict[str, Any]]:
    return settled_audit(gw, *args)  # the outcomes are group-committed after the response


def agent_audit(gw: GatewayProcess, agent: str, done: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The agent's audit records, once `done(records)` holds and every allowed call has its outcome."""
    return settled_audit(
        gw, "--agent", agent, "--limit", "1000", until=lambda rs: done(rs) and outcomes_committed(rs), timeout=timeout
    )


def of(records: list[dict[str, Any]], tool: str) -> list[dict[str, Any]]:
    return [r for r in records if r["tool"] == tool]


@pytest.mark.timeout(300)
def test_the_sdk_clients_task_augmented_call_gets_the_result_of_a_call_that_ran_once(gateway: GatewayProcess) -> None:
    tasks = Tasks()

    async def run() -> types.CallToolResult:
        async with connect(gateway, "task-agent", tasks) as client:
            return await client.call_tool("slow_compute", {"seconds": 1, "label": "sdk-task"})

    result = asyncio.run(run())
    assert "computed sdk-task" in "".join(getattr(b, "text", "") for b in result.content)
    [created] = tasks.created
    assert created.status == "working"
    assert created.ttl_ms == 3_600_000
    # the governed call: one decision, allowed, with its outcome; the task: its creation and its end
    records = agent_audit(gateway, "task-agent", lambda rs: of(rs, "tasks/end") and of(rs, "slow_compute"))
    [call] = of(records, "slow_compute")
    assert call["decision"] == "allow"
    [made] = of(records, "tasks/create")
    assert made["action"] == "task"
    assert made["arguments"]["task_id"] == created.task_id
    assert made["arguments"]["call_id"] == call["call_id"]
    [ended] = of(records, "tasks/end")
    assert ended["arguments"]["task_id"] == created.task_id
    assert ended["arguments"]["status"] == "completed"


@pytest.mark.timeout(300)
def test_only_the_identity_that_started_a_task_can_see_or_cancel_it(gateway: GatewayProcess) -> None:
    async def run() -> None:
        async with (
            connect(gateway, "owner-agent", Tasks()) as owner,
            connect(gateway, "other-agent", Tasks()) as stranger,
            connect(gateway, "second-agent", Tasks(), subject="owner-agent") as same_subject,
        ):
            created = await owner.session.call_tool(
                "slow_compute", {"seconds": 30, "label": "owned"}, allow_claimed=True
            )
            assert isinstance(created, CreateTaskResult)
            for other in (stranger, same_subject):  # another subject; the same subject as another agent
                for request in (
                    GetTask(params=TaskParams(task_id=created.task_id)),
                    CancelTask(params=TaskParams(task_id=created.task_id)),
                    UpdateTask(params=UpdateParams(task_id=created.task_id, input_responses={})),
                ):
                    with pytest.raises(MCPError) as refused:
                        await other.session.send_request(request, types.EmptyResult)
                    with pytest.raises(MCPError) as unknown:
                        await other.session.send_request(GetTask(params=TaskParams(task_id="no-such")), DetailedTask)
                    assert refused.value.error.code == unknown.value.error.code == types.INVALID_PARAMS
                    assert refused.value.error.message == unknown.value.error.message
            assert (await get_task(owner.session, created.task_id)).status == "working"
            await owner.session.send_request(CancelTask(params=TaskParams(task_id=created.task_id)), types.EmptyResult)
            assert (await until(owner.session, created.task_id)).status == "cancelled"

    asyncio.run(run())
    # only the owner's cancel happened; the governed call itself was stopped and is recorded as cancelled
    assert of(audit(gateway, "--agent", "other-agent"), "tasks/cancel") == []
    assert of(audit(gateway, "--agent", "second-agent"), "tasks/cancel") == []
    records = agent_audit(
        gateway, "owner-agent", lambda rs: of(rs, "tasks/end") and all(r.get("outcome") for r in of(rs, "slow_compute"))
    )
    assert len(of(records, "tasks/cancel")) == 1
    [call] = of(records, "slow_compute")
    assert call["decision"] == "allow"
    assert call["outcome"].get("cancelled") is True
    assert [r["arguments"]["status"] for r in of(records, "tasks/end")] == ["cancelled"]


@pytest.mark.timeout(300)
def test_a_task_that_asks_the_agent_is_answered_through_tasks_update(gateway: GatewayProcess) -> None:
    async def run() -> DetailedTask:
        async with connect(gateway, "asking-agent", Tasks(), elicits=True) as client:
            created = await client.session.call_tool("confirm_delete", {"filename": "report.csv"}, allow_claimed=True)
            assert isinstance(created, CreateTaskResult)
            waiting = await until(client.session, created.task_id, "input_required")
            assert waiting.status == "input_required"
            [(key, request)] = (waiting.input_requests or {}).items()
            assert request["method"] == "elicitation/create"
            answer = {key: {"action": "accept", "content": {"confirm": True}}}
            await client.session.send_request(
                UpdateTask(params=UpdateParams(task_id=created.task_id, input_responses=answer)), types.EmptyResult
            )
            return await until(client.session, created.task_id)

    finished = asyncio.run(run())
    assert finished.status == "completed"
    assert finished.result is not None
    assert finished.result["content"][0]["text"] == "deleted report.csv"
    # the relayed elicitation was decided and recorded as a child span of the call
    records = agent_audit(gateway, "asking-agent", lambda rs: all(r.get("outcome") for r in of(rs, "confirm_delete")))
    [call] = of(records, "confirm_delete")
    [span] = call["outcome"]["relayed"]
    assert span["action"] == "elicit"
    assert span["decision"] == "allow"


@pytest.mark.timeout(300)
def test_a_tool_that_requires_tasks_is_refused_and_recorded_for_a_client_without_them(gateway: GatewayProcess) -> None:
    async def run() -> None:
        async with connect(gateway, "plain-agent") as client:
            with pytest.raises(MCPError) as refused:
                await client.call_tool("failing_job", {})
            assert refused.value.error.code == -32021

    asyncio.run(run())
    [record] = of(audit(gateway, "--agent", "plain-agent"), "failing_job")
    assert record["decision"] == "deny"
    assert record["stage"] == "tasks"
