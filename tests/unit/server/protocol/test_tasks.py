"""Tasks at the MCP edge: a task is its starter's alone (same subject and agent), lives at most its TTL,
runs its call once, and its creation, end and cancel are audited."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from starlette.requests import Request

from server.auth.middleware import IDENTITY_SCOPE_KEY
from server.call import Call
from server.identity import Identity
from server.protocol.tasks import TaskCalls, TaskIdParams, TaskUpdateParams, ToolWatch
from server.registry import ToolOutput, ToolRegistry, ToolSpec
from server.settings import TasksSettings
from server.tasks.audit import TaskAudit
from tests.fakes.backends import FakeTool, MemoryOutbox, make_call, make_identity

pytestmark = pytest.mark.anyio
TASKS = {"extensions": {"io.modelcontextprotocol/tasks": {}}}


def registry(support: str = "optional") -> ToolRegistry:
    spec = ToolSpec(
        name="slow", description="", securable="main.tools.slow", input_schema={"type": "object"}, task_support=support
    )
    return ToolRegistry([FakeTool(spec=spec)])


def ctx(identity: Identity | None, *, capabilities: dict[str, Any] | None = None, version: str = "2026-07-28",
        method: str = "tools/call", headers: dict[str, str] | None = None) -> Any:  # fmt: skip
    scope = {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    scope[IDENTITY_SCOPE_KEY] = identity
    caps = types.ClientCapabilities.model_validate(TASKS if capabilities is None else capabilities)
    return SimpleNamespace(
        protocol_version=version,
        session=SimpleNamespace(client_capabilities=caps),
        request=Request(scope),
        method=method,
    )


def done(call: Call, text: str = "finished") -> Call:
    return replace(call, output=ToolOutput(text=text))


class Runs:
    """The call's work as the edge hands it over: counts its runs, finishes when told."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.runs = 0
        self.release = asyncio.Event()
        self.resumed: list[dict[str, Any]] = []
        self.asked: dict[str, Any] = {}

    async def first(self) -> Call | types.InputRequiredResult:
        self.runs += 1
        if self.asked:
            return types.InputRequiredResult.model_validate({"inputRequests": self.asked, "requestState": "r1"})
        await self.release.wait()
        return done(self.call)

    async def resume(self, responses: dict[str, Any], state: str | None) -> Call | types.InputRequiredResult:
        """As the relay: the call goes on once every request it asked is answered."""
        self.resumed.append(responses)
        answered = {k for r in self.resumed for k in r}
        pending = {k: v for k, v in self.asked.items() if k not in answered}
        if pending:
            return types.InputRequiredResult.model_validate({"inputRequests": pending, "requestState": "next"})
        return done(self.call, f"answered {sorted(answered)}")

    async def answer(self, call: Call) -> types.CallToolResult:
        assert call.output is not None
        return types.CallToolResult(content=[types.TextContent(type="text", text=call.output.text)])


def tasks(outbox: MemoryOutbox | None = None, support: str = "optional", **settings: Any) -> TaskCalls:
    config = TasksSettings(promote_after_seconds=0, **settings)
    return TaskCalls(config, registry(support), TaskAudit(outbox or MemoryOutbox()))


async def start(calls: TaskCalls, runs: Runs, identity: Identity) -> str:
    created = await calls.run(ctx(identity), runs.call, runs.first, runs.resume, runs.answer)
    assert isinstance(created, dict)
    assert created["resultType"] == "task"
    return str(created["taskId"])


async def settled(calls: TaskCalls, identity: Identity, task_id: str) -> dict[str, Any]:
    for _ in range(200):
        got = await calls.get(ctx(identity, method="tasks/get"), TaskIdParams(taskId=task_id))
        if got["status"] in ("completed", "failed", "cancelled"):
            return got
        await asyncio.sleep(0.01)
    raise AssertionError("the task did not settle")


async def ended(outbox: MemoryOutbox) -> None:
    """Until the task's end is audited."""
    for _ in range(300):
        if any(r.get("tool") == "tasks/end" for k, _, r in outbox.records if k == "decision"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the task's end was not audited")


@pytest.mark.parametrize(
    "other",
    [make_identity(subject="mallory"), make_identity(agent_id="agent-2"), make_identity(issuer="elsewhere")],
    ids=["other subject", "same subject, other agent", "other issuer"],
)
async def test_only_the_identity_that_started_a_task_sees_updates_or_cancels_it(other: Identity) -> None:
    owner, calls = make_identity(), tasks()
    runs = Runs(make_call(tool_name="slow", identity=owner))
    task_id = await start(calls, runs, owner)
    for method, params in (
        ("tasks/get", TaskIdParams(taskId=task_id)),
        ("tasks/cancel", TaskIdParams(taskId=task_id)),
        ("tasks/update", TaskUpdateParams(taskId=task_id, inputResponses={})),
    ):
        handler = {"tasks/get": calls.get, "tasks/cancel": calls.cancel, "tasks/update": calls.update}[method]
        with pytest.raises(MCPError) as theirs:
            await handler(ctx(other, method=method), params)  # type: ignore[operator]
        with pytest.raises(MCPError) as unknown:
            await handler(
                ctx(other, method=method),
                type(params).model_validate({**params.model_dump(by_alias=True), "taskId": "nope"}),
            )  # type: ignore[operator]
        assert theirs.value.error.code == unknown.value.error.code == types.INVALID_PARAMS
        assert theirs.value.error.message == unknown.value.error.message
    # the foreign cancel did nothing: the owner's task runs on and completes
    assert (await calls.get(ctx(owner, method="tasks/get"), TaskIdParams(taskId=task_id)))["status"] == "working"
    runs.release.set()
    finished = await settled(calls, owner, task_id)
    assert finished["status"] == "completed"
    assert finished["result"]["content"][0]["text"] == "finished"
    assert runs.runs == 1  # the governed call ran once


async def test_a_caller_without_an_identity_never_finds_a_task() -> None:
    owner, calls = make_identity(), tasks()
    runs = Runs(make_call(tool_name="slow", identity=owner))
    task_id = await start(calls, runs, owner)
    with pytest.raises(MCPError) as refused:
        await calls.get(ctx(None, method="tasks/get"), TaskIdParams(taskId=task_id))
    assert refused.value.error.code == types.INVALID_PARAMS
    await calls.close()


async def test_a_task_that_outlives_its_ttl_is_cancelled_forgotten_and_audited() -> None:
    owner, outbox = make_identity(), MemoryOutbox()
    calls = tasks(outbox, default_ttl_seconds=0.2)
    runs = Runs(make_call(tool_name="slow", identity=owner))
    task_id = await start(calls, runs, owner)
    await ended(outbox)
    with pytest.raises(MCPError) as gone:
        await calls.get(ctx(owner, method="tasks/get"), TaskIdParams(taskId=task_id))
    assert gone.value.error.code == types.INVALID_PARAMS
    ends = [r for k, _, r in outbox.records if k == "outcome" and "expired" in (r.get("result_preview") or "")]
    assert len(ends) == 1


async def test_the_ttl_is_capped_by_the_maximum() -> None:
    owner, calls = make_identity(), tasks(default_ttl_seconds=7200, max_ttl_seconds=60)
    runs = Runs(make_call(tool_name="slow", identity=owner))
    created = await calls.run(ctx(owner), runs.call, runs.first, runs.resume, runs.answer)
    assert isinstance(created, dict)
    assert created["ttlMs"] == 60_000
    await calls.close()


async def test_creation_end_and_cancel_are_audited_as_task_acts() -> None:
    owner, outbox = make_identity(), MemoryOutbox()
    calls = tasks(outbox)
    runs = Runs(make_call(tool_name="slow", identity=owner))
    task_id = await start(calls, runs, owner)
    await calls.cancel(ctx(owner, method="tasks/cancel"), TaskIdParams(taskId=task_id))
    assert (await settled(calls, owner, task_id))["status"] == "cancelled"
    await ended(outbox)
    decisions = [r for k, _, r in outbox.records if k == "decision"]
    assert [r["tool"] for r in decisions] == ["tasks/create", "tasks/cancel", "tasks/end"]
    assert {r["action"] for r in decisions} == {"task"}
    assert {r["arguments"]["task_id"] for r in decisions} == {task_id}
    assert {r["arguments"]["call_id"] for r in decisions} == {runs.call.call_id}
    assert {r["subject"] for r in decisions} == {"alice"}
    assert decisions[-1]["arguments"]["status"] == "cancelled"
    # cancelling again, once it has ended, is acked and changes nothing
    assert await calls.cancel(ctx(owner, method="tasks/cancel"), TaskIdParams(taskId=task_id)) == {}


async def test_a_task_is_not_created_when_its_record_cannot_be_written_and_the_call_goes_on() -> None:
    owner, outbox = make_identity(), MemoryOutbox(down=True)
    calls = tasks(outbox)
    runs = Runs(make_call(tool_name="slow", identity=owner))
    runs.release.set()
    answered = await calls.run(ctx(owner), runs.call, runs.first, runs.resume, runs.answer)
    assert isinstance(answered, types.CallToolResult)
    assert runs.runs == 1
    assert len(calls) == 0


async def test_a_task_waiting_for_input_takes_answers_in_parts_and_resumes_its_call() -> None:
    owner, calls = make_identity(), tasks()
    runs = Runs(make_call(tool_name="slow", identity=owner))
    both = {"a": {"method": "roots/list"}, "b": {"method": "roots/list"}}
    runs.asked = both
    task_id = await start(calls, runs, owner)
    get = TaskIdParams(taskId=task_id)
    for _ in range(100):
        waiting = await calls.get(ctx(owner, method="tasks/get"), get)
        if waiting["status"] == "input_required":
            break
        await asyncio.sleep(0.01)
    assert set(waiting["inputRequests"]) == {"a", "b"}
    roots = {"roots": []}
    await calls.update(ctx(owner, method="tasks/update"), TaskUpdateParams(taskId=task_id, inputResponses={"a": roots}))
    partial = await calls.get(ctx(owner, method="tasks/get"), get)
    assert partial["status"] == "input_required"
    assert set(partial["inputRequests"]) == {"b"}
    await calls.update(ctx(owner, method="tasks/update"), TaskUpdateParams(taskId=task_id, inputResponses={"b": roots}))
    finished = await settled(calls, owner, task_id)
    assert finished["status"] == "completed"
    assert finished["result"]["content"][0]["text"] == "answered ['a', 'b']"
    assert [k for r in runs.resumed for k in r] == ["a", "b"]  # each answer delivered once
    assert runs.runs == 1


async def test_a_tool_that_requires_tasks_is_refused_to_a_caller_that_did_not_declare_them() -> None:
    calls = tasks(support="required")
    params = types.CallToolRequestParams(name="slow", arguments={})
    with pytest.raises(MCPError) as refused:
        calls.wanted(ctx(make_identity(), capabilities={}), params)
    assert refused.value.error.code == -32021
    assert refused.value.error.data == {"requiredCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}}
    assert not tasks().wanted(ctx(make_identity(), capabilities={}), params)  # optional: a plain call
    assert not tasks().wanted(ctx(make_identity(), version="2025-11-25"), params)  # the extension is 2026-07-28's


async def test_a_caller_without_an_identity_gets_a_plain_call() -> None:
    params = types.CallToolRequestParams(name="slow", arguments={})
    assert not tasks().wanted(ctx(None), params)


async def test_a_caller_may_declare_the_extension_on_one_request() -> None:
    meta = {"io.modelcontextprotocol/clientCapabilities": TASKS}
    params = types.CallToolRequestParams.model_validate({"name": "slow", "arguments": {}, "_meta": meta})
    assert tasks().wanted(ctx(make_identity(), capabilities={}), params)


async def test_the_task_methods_need_the_extension_and_the_2026_protocol() -> None:
    calls = tasks()
    with pytest.raises(MCPError) as undeclared:
        await calls.get(ctx(make_identity(), capabilities={}, method="tasks/get"), TaskIdParams(taskId="x"))
    assert undeclared.value.error.code == -32021
    with pytest.raises(MCPError) as legacy:
        await calls.get(ctx(make_identity(), version="2025-11-25", method="tasks/get"), TaskIdParams(taskId="x"))
    assert legacy.value.error.code == types.METHOD_NOT_FOUND


async def test_a_routing_header_that_names_another_task_is_refused() -> None:
    calls = tasks()
    headers = {"Mcp-Name": "other"}
    with pytest.raises(MCPError) as mismatch:
        await calls.get(ctx(make_identity(), method="tasks/get", headers=headers), TaskIdParams(taskId="x"))
    assert mismatch.value.error.code == -32020


async def test_a_quick_call_is_answered_plainly_and_becomes_no_task() -> None:
    owner = make_identity()
    calls = TaskCalls(TasksSettings(promote_after_seconds=5), registry(), TaskAudit(MemoryOutbox()))
    runs = Runs(make_call(tool_name="slow", identity=owner))
    runs.release.set()
    answered = await calls.run(ctx(owner), runs.call, runs.first, runs.resume, runs.answer)
    assert isinstance(answered, types.CallToolResult)
    assert len(calls) == 0


def test_the_extension_is_declared_to_2026_clients_only() -> None:
    from server.protocol.surface import GatewayServer

    server = GatewayServer("castellan")
    tasks().attach(server)
    modern = server.get_capabilities(protocol_version="2026-07-28")
    assert modern.extensions is not None
    assert "io.modelcontextprotocol/tasks" in modern.extensions
    legacy = server.create_initialization_options().capabilities  # a 2025-era initialize
    assert legacy.extensions is None
    assert legacy.model_dump(exclude_none=True).get("tasks") is None  # nor the 2025-era tasks capability


async def test_the_window_counts_from_the_tools_start_and_an_ask_in_progress_keeps_the_call_plain() -> None:
    owner = make_identity()
    calls = TaskCalls(TasksSettings(promote_after_seconds=0.2), registry(), TaskAudit(MemoryOutbox()))
    runs = Runs(make_call(tool_name="slow", identity=owner))
    relay = SimpleNamespace(call=None, deciding=0)
    watch = ToolWatch()
    watch.seen(relay)
    asks = types.InputRequiredResult.model_validate({"inputRequests": {"k": {"method": "roots/list"}}})

    async def first() -> Call | types.InputRequiredResult:
        await asyncio.sleep(0.5)  # the stages before the tool, slow on a loaded machine
        relay.call = runs.call  # the invoke stage binds the relay
        relay.deciding = 1  # the tool asks the agent; policy takes its time deciding
        await asyncio.sleep(0.4)
        return asks

    answered = await calls.run(ctx(owner), runs.call, first, runs.resume, runs.answer, watch)
    assert answered is asks  # a plain input round, not a task
    assert len(calls) == 0
