"""The agent's model client: retries what is worth retrying, says what went wrong in one line, carries the run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web

from agent_client.agent import Agent
from agent_client.gateway import Observation, RunContext
from agent_client.models import ModelError, OpenAICompatibleModel, Reply, ToolCall
from tests.fakes.loopback import serve_app

pytestmark = pytest.mark.anyio

ANSWER = {"choices": [{"message": {"role": "assistant", "content": "done"}}], "usage": {"total_tokens": 3}}


def _app(answers: list[tuple[int, Any, dict[str, str]]], seen: list[web.Request]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        seen.append(request)
        status, body, headers = answers.pop(0) if answers else (200, ANSWER, {})
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_rate_limits_and_server_errors_are_retried_until_an_answer(status: int) -> None:
    seen: list[web.Request] = []
    answers = [(status, {"error": {"message": "slow down"}}, {"Retry-After": "0"})] * 2
    async with serve_app(_app(answers, seen)) as url:
        model = OpenAICompatibleModel(f"{url}/v1", "k", "m", retries=3, backoff=0.01)
        reply = await model.complete([{"role": "user", "content": "hi"}], [], run_id="run-1")
    assert reply.content == "done"
    assert len(seen) == 3
    assert all(r.headers["x-castellan-run-id"] == "run-1" for r in seen)


async def test_a_client_error_is_not_retried_and_reads_as_one_line() -> None:
    seen: list[web.Request] = []
    answers = [(400, {"error": {"message": "model 'm' does not exist"}}, {})]
    async with serve_app(_app(answers, seen)) as url:
        model = OpenAICompatibleModel(f"{url}/v1", "k", "m", retries=3, backoff=0.01)
        with pytest.raises(ModelError, match="400: model 'm' does not exist") as raised:
            await model.complete([], [])
    assert len(seen) == 1
    assert "\n" not in str(raised.value)


async def test_retries_end_with_the_last_error_named() -> None:
    answers = [(503, {"error": "down"}, {})] * 5
    async with serve_app(_app(answers, [])) as url:
        model = OpenAICompatibleModel(f"{url}/v1", "k", "m", retries=2, backoff=0.01)
        with pytest.raises(ModelError, match="failed 3 times, last: 503: down"):
            await model.complete([], [])


async def test_tool_call_arguments_that_are_not_a_json_object_come_back_as_an_error_not_a_crash() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "echo", "arguments": '{"text": "hi"'}},
        {"id": "b", "type": "function", "function": {"name": "echo", "arguments": "[1, 2]"}},
        {"id": "c", "type": "function", "function": {"name": "echo", "arguments": '{"text": "ok"}'}},
    ]
    body = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": calls}}]}
    async with serve_app(_app([(200, body, {})], [])) as url:
        reply = await OpenAICompatibleModel(f"{url}/v1", "k", "m").complete([], [])
    broken, not_object, fine = reply.tool_calls
    assert broken.error is not None
    assert "not valid JSON" in broken.error
    assert not_object.error == "the arguments must be one JSON object"
    assert fine.error is None
    assert fine.arguments == {"text": "ok"}


class _Session:
    def __init__(self) -> None:
        self.called: list[dict[str, Any]] = []

    async def tools(self) -> list[Any]:
        class Echo:
            name, description, input_schema = "echo", "echo", {"type": "object"}

        return [Echo()]

    async def call(self, tool: str, arguments: dict[str, Any], run: RunContext) -> Observation:
        self.called.append(arguments)
        return Observation(tool=tool, arguments=arguments, decision="allow", ok=True, text="hi", latency_ms=1.0)


class _Model:
    name = "fake"

    def __init__(self) -> None:
        self.turns: list[list[dict[str, Any]]] = []

    async def complete(self, messages: Any, tools: Any, run_id: str | None = None) -> Reply:
        self.turns.append(list(messages))
        if len(self.turns) == 1:
            return Reply(tool_calls=(ToolCall("x", "echo", {}, "the arguments are not valid JSON (...)"),))
        if len(self.turns) == 2:
            return Reply(tool_calls=(ToolCall("y", "echo", {"text": "hi"}),))
        return Reply(content="said hi")


async def test_the_agent_sends_an_unusable_tool_call_back_to_the_model_and_goes_on() -> None:
    session, model = _Session(), _Model()
    result = await Agent(session, model).run("say hi")  # type: ignore[arg-type]
    assert result.stop_reason == "answer"
    assert session.called == [{"text": "hi"}]  # the broken call was never made
    error = json.loads(model.turns[1][-1]["content"])
    assert "not valid JSON" in error["error"]
