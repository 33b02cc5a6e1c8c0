from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from server.errors import Denied, InvalidArguments
from server.invoke import InvokeStage
from server.registry import ToolOutput, ToolRegistry
from server.resolve import ResolveStage
from server.validate import ValidateStage
from tests.fakes.backends import FakeTool, make_call

pytestmark = pytest.mark.anyio


async def test_a_known_tool_is_resolved() -> None:
    tool = FakeTool()
    call = await ResolveStage(ToolRegistry([tool])).run(make_call(tool=None))
    assert call.tool is tool


async def test_an_unknown_tool_is_denied() -> None:
    with pytest.raises(Denied, match="unknown tool 'nope'"):
        await ResolveStage(ToolRegistry([FakeTool()])).run(make_call(tool=None, tool_name="nope"))


async def test_arguments_that_break_the_schema_stop_the_call_with_the_path() -> None:
    tool = FakeTool()
    with pytest.raises(InvalidArguments, match="q: 5 is not of type 'string'"):
        await ValidateStage(ToolRegistry([tool])).run(make_call(tool=tool, arguments={"q": 5}))


async def test_a_tool_that_raises_gives_an_error_result_not_a_crash() -> None:
    call = await InvokeStage(5.0).run(make_call(tool=FakeTool(error=ValueError("bad input"))))
    assert call.output == ToolOutput(text="tool fake failed: ValueError: bad input", is_error=True)


async def test_a_tool_that_hangs_times_out_as_an_error_result() -> None:
    class Slow(FakeTool):
        async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
            await asyncio.sleep(10)
            raise AssertionError("unreachable")

    call = await InvokeStage(0.05).run(make_call(tool=Slow()))
    assert call.output is not None
    assert call.output.is_error
    assert "timed out after 0.05s" in call.output.text


@pytest.mark.parametrize("number", [float("nan"), float("inf"), 2**53, -(2**63)])
async def test_numbers_outside_i_json_are_refused(number: float) -> None:
    tool = FakeTool()
    with pytest.raises(InvalidArguments, match=r"I-JSON, RFC 7493"):
        await ValidateStage(ToolRegistry([tool])).run(make_call(tool=tool, arguments={"q": [{"n": number}]}))
