"""What metering tells Rego: the sliding-window counts and their limits, in `input.budget`."""

from __future__ import annotations

import pytest

from server.llm.model import model_tool
from server.metering.stage import AdmitStage
from server.metering.tokens import TokenCounter
from server.policy._input import build_input, schema_errors
from server.settings import Limits, LlmSettings, MeterSettings
from tests.fakes.backends import MemoryMeter, allowed, make_call

pytestmark = pytest.mark.anyio


async def test_the_caller_independent_limits_are_in_the_budget_rego_sees() -> None:
    settings = MeterSettings(limits=Limits(max_identical_calls=7, max_calls_per_tool=40, tool_calls_window_seconds=30))
    call = await AdmitStage(MemoryMeter(), settings, TokenCounter()).run(make_call())
    document = build_input(allowed(call))
    assert schema_errors(document) == []
    budget = document["budget"]
    assert (budget["identical_calls_limit"], budget["identical_calls_window_seconds"]) == (7, 300)
    assert (budget["tool_calls_limit"], budget["tool_calls_window_seconds"]) == (40, 30)


def test_an_llm_call_is_a_valid_decision_input_with_action_llm() -> None:
    tool = model_tool(LlmSettings(), "gpt-4o-mini")
    call = make_call(tool=tool, tool_name=tool.spec.name, action="llm", arguments={"model": "gpt-4o-mini", "n": 2})
    document = build_input(allowed(call))
    assert schema_errors(document) == []
    assert (document["action"], document["tool"]["name"], document["tool"]["securable"]) == (
        "llm",
        "llm:chat.completions",
        "main.llm.gpt-4o-mini",
    )
