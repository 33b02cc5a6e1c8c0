"""The relay of one call: each request an upstream raises is decided, metered and recorded before it
reaches the agent's channel; the predicate says when anything can be relayed at all."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from server.audit.traces import _relayed_spans
from server.call import Budget
from server.metering.tokens import TokenCounter
from server.policy._input import build_relay_input, input_problem
from server.policy.engine import Decision
from server.registry import ToolSpec
from server.relay.channel import ELICIT, ROOTS, SAMPLE, InputRequiredChannel, RelayUnsupported
from server.relay.needed import relay_needed
from server.relay.relay import Governor, Relay, RelayRefused
from server.relay.rounds import Round, Rounds
from tests.fakes.backends import FakeTool, StaticPolicy, make_call

SAMPLING = {"messages": [{"role": "user", "content": {"type": "text", "text": "capital of France?"}}], "maxTokens": 50}
ANSWER = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m"}


class FakeChannel:
    """An agent that supports `methods` and answers each with `answers[method]`."""

    era = "session"

    def __init__(self, *methods: str, answers: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.methods = set(methods)
        self.answers = dict(answers or {})
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.notified: list[tuple[str, dict[str, Any]]] = []

    def supports(self, method: str) -> bool:
        return method in self.methods

    async def request(self, method: str, params: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        if method not in self.methods:
            raise RelayUnsupported("no")
        self.asked.append((method, dict(params)))
        return self.answers[method]

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        self.notified.append((method, dict(params)))


def upstream_call(**overrides: Any) -> Any:
    spec = ToolSpec(
        name="files.ask", description="", securable="main.upstream.files__ask", input_schema={"type": "object"},
        upstream="files",
    )  # fmt: skip
    return make_call(tool=FakeTool(spec=spec), tool_name="files.ask", **overrides)


def relay_for(channel: Any, policy: StaticPolicy | None = None, **call: Any) -> tuple[Relay, StaticPolicy]:
    engine = policy or StaticPolicy()
    relay = Relay(channel, Governor(engine, TokenCounter("cl100k_base")), progress_token="agent-token")
    relay.bind(upstream_call(**call))
    return relay, engine


def test_an_allowed_sampling_request_reaches_the_agent_and_is_recorded_and_counted() -> None:
    channel = FakeChannel(SAMPLE, answers={SAMPLE: ANSWER})
    relay, engine = relay_for(channel)
    result = asyncio.run(relay.request(SAMPLE, SAMPLING))
    assert result == ANSWER
    assert channel.asked == [(SAMPLE, SAMPLING)]
    document = engine.inputs[0]
    assert (document["action"], document["tool"]["upstream"], document["request"]["method"]) == (
        "sample", "files", SAMPLE,
    )  # fmt: skip
    assert ["content", "capital of france?"] in [
        s for s in document["request"]["strings"] if s[0] == "messages"
    ] or any("capital of france?" in s[1] for s in document["request"]["strings"])
    [span] = relay.spans
    assert (span["action"], span["decision"], span["outcome"], span["upstream"]) == (
        "sample",
        "allow",
        "answered",
        "files",
    )
    assert relay.sampled_tokens == span["tokens"] > 0


def test_a_denied_request_never_reaches_the_agent_and_says_why() -> None:
    channel = FakeChannel(ELICIT, answers={ELICIT: {"action": "accept"}})
    relay, _ = relay_for(channel, StaticPolicy(Decision.deny("upstream files may not elicit")))
    with pytest.raises(RelayRefused) as refused:
        asyncio.run(relay.request(ELICIT, {"message": "your password?", "requestedSchema": {"type": "object"}}))
    assert channel.asked == []
    assert refused.value.body == {
        "decision": "deny", "stage": "policy", "action": "elicit", "reasons": ["upstream files may not elicit"],
    }  # fmt: skip
    assert relay.spans[0]["decision"] == "deny"
    assert relay.spans[0]["outcome"] == "denied"


def test_a_policy_engine_that_cannot_answer_refuses_the_request() -> None:
    relay, _ = relay_for(FakeChannel(ROOTS, answers={ROOTS: {"roots": []}}), StaticPolicy(down=True))
    with pytest.raises(RelayRefused) as refused:
        asyncio.run(relay.request(ROOTS, {}))
    assert refused.value.body["stage"] == "policy"


def test_a_capability_the_agent_lacks_is_refused_without_asking_policy() -> None:
    relay, engine = relay_for(FakeChannel())
    with pytest.raises(RelayRefused) as refused:
        asyncio.run(relay.request(SAMPLE, SAMPLING))
    assert refused.value.body["stage"] == "relay"
    assert "does not support sampling" in refused.value.body["reasons"][0]
    assert engine.inputs == []


def test_sampling_beyond_the_calls_token_reservation_is_refused() -> None:
    channel = FakeChannel(SAMPLE, answers={SAMPLE: ANSWER})
    relay, _ = relay_for(channel, budget=Budget(reserved_tokens=40, tokens_limit=1000))
    with pytest.raises(RelayRefused) as refused:
        asyncio.run(relay.request(SAMPLE, SAMPLING))  # maxTokens 50 alone exceeds 40
    assert refused.value.body["stage"] == "metering"
    assert channel.asked == []


def test_progress_goes_to_the_agent_under_its_own_token() -> None:
    channel = FakeChannel()
    relay, _ = relay_for(channel)
    asyncio.run(relay.notify("notifications/progress", {"progressToken": "upstream-token", "progress": 1}))
    assert channel.notified == [("notifications/progress", {"progressToken": "agent-token", "progress": 1})]


def test_the_relay_input_document_is_valid_against_the_schema() -> None:
    document = build_relay_input(upstream_call(budget=Budget()), "elicit", ELICIT, {"message": "hi", "n": 1.0})
    assert input_problem(document) is None
    assert document["request"]["params"] == {"message": "hi", "n": 1}


@pytest.mark.parametrize(
    ("capabilities", "meta", "expected"),
    [
        ({}, {}, False),
        (None, None, False),
        ({"sampling": {}}, {}, True),
        ({"elicitation": {"form": {}}}, {}, True),
        ({"roots": {}}, {}, True),
        ({}, {"progressToken": 3}, True),
        ({}, {"progress_token": "t"}, True),
        ({}, {"io.modelcontextprotocol/logLevel": "info"}, True),
        (None, {"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}, True),
        ({"experimental": {}}, {}, False),
    ],
)
def test_relay_needed(capabilities: Any, meta: Any, expected: bool) -> None:
    assert relay_needed(capabilities, meta) is expected


def test_a_task_or_a_log_level_needs_the_relay() -> None:
    assert relay_needed({}, {}, task_requested=True)
    assert relay_needed({}, {}, log_level_set=True)


class _Ctx:
    class session:
        client_capabilities = None


def test_an_answer_that_is_not_a_result_of_its_request_is_an_error_for_that_request() -> None:
    async def run() -> None:
        channel = InputRequiredChannel(_Ctx())  # type: ignore[arg-type]
        channel.supports = lambda method: True  # type: ignore[method-assign]
        asked = asyncio.ensure_future(channel.request(ELICIT, {"message": "name?"}, key="user_name"))
        await asyncio.sleep(0)
        assert list(channel.input_requests()) == ["user_name"]
        channel.answer({"user_name": {"roots": "nonsense"}, "stray": {"action": "accept"}})
        with pytest.raises(Exception, match="invalid response"):
            await asked

    asyncio.run(run())


def test_answers_offered_before_the_question_answer_it() -> None:
    async def run() -> dict[str, Any]:
        channel = InputRequiredChannel(_Ctx())  # type: ignore[arg-type]
        channel.supports = lambda method: True  # type: ignore[method-assign]
        channel.offered = {"user_name": {"action": "accept", "content": {"name": "Alice"}}}
        return await channel.request(ELICIT, {"message": "name?"}, key="user_name")

    assert asyncio.run(run()) == {"action": "accept", "content": {"name": "Alice"}}


def test_a_waiting_call_is_given_only_to_the_identity_that_started_it_and_expires() -> None:
    async def run() -> None:
        rounds = Rounds(ttl_seconds=60)
        relay, _ = relay_for(FakeChannel())
        task = asyncio.ensure_future(asyncio.sleep(10))
        channel = InputRequiredChannel(_Ctx())  # type: ignore[arg-type]
        round_id = rounds.park(Round(principal="alice", task=task, relay=relay, channel=channel))  # type: ignore[arg-type]
        assert rounds.take(round_id, "mallory") is None
        assert rounds.take(round_id, "alice") is not None
        assert rounds.take(round_id, "alice") is None  # taken once
        short = Rounds(ttl_seconds=0.01)
        short.park(Round(principal="alice", task=task, relay=relay, channel=channel))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert short.take("anything", "alice") is None
        assert relay.cancelled  # the expired call was cancelled
        task.cancel()

    asyncio.run(run())


def test_relayed_requests_are_child_spans_of_the_calls_trace() -> None:
    relayed = {"action": "sample", "method": SAMPLE, "upstream": "files", "decision": "deny", "stage": "policy"}
    outcome = {"relayed": [relayed | {"reasons": ["no"], "outcome": "denied", "started_at": 1.5, "ms": 2.0}]}
    [span] = _relayed_spans(outcome, 0)
    assert (span.name, span.span_type, span.ok) == ("relay sample", "LLM", False)
    assert span.end_ns - span.start_ns == 2_000_000
    assert span.outputs["reasons"] == ["no"]


def test_the_relay_is_not_part_of_call_equality() -> None:
    call = upstream_call()
    assert replace(call, relay=Relay(FakeChannel(), Governor(StaticPolicy(), TokenCounter("cl100k_base")))) == call
