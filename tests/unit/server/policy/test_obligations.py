from __future__ import annotations

import json

import pytest

from server.policy.engine import Decision
from server.policy.obligations import REDACTED, ObligationsStage
from server.registry import ToolOutput
from tests.fakes.backends import make_call

pytestmark = pytest.mark.anyio


def with_obligations(output: ToolOutput, **obligations: object) -> object:
    return make_call(output=output, decision=Decision(allow=True, obligations=obligations))


async def test_named_fields_are_redacted_at_any_depth() -> None:
    structured = {"email": "a@x", "orders": [{"id": 1, "email": "b@x"}], "name": "Ada"}
    call = make_call(
        output=ToolOutput(text=json.dumps(structured), structured=structured),
        decision=Decision(allow=True, obligations={"redact_fields": ["email"]}),
    )
    out = (await ObligationsStage().run(call)).output
    assert out is not None
    assert out.structured == {"email": REDACTED, "orders": [{"id": 1, "email": REDACTED}], "name": "Ada"}
    assert "a@x" not in out.text
    assert "b@x" not in out.text


async def test_json_text_results_are_redacted_too() -> None:
    call = make_call(
        output=ToolOutput(text='{"token": "s3cret"}'),
        decision=Decision(allow=True, obligations={"redact_fields": ["token"]}),
    )
    out = (await ObligationsStage().run(call)).output
    assert out is not None
    assert "s3cret" not in out.text


async def test_results_over_the_cap_are_truncated_and_say_so() -> None:
    call = make_call(
        output=ToolOutput(text="x" * 100, structured={"x": "x" * 90}),
        decision=Decision(allow=True, obligations={"max_result_chars": 10}),
    )
    out = (await ObligationsStage().run(call)).output
    assert out is not None
    assert out.text.startswith("x" * 10 + "\n[truncated by policy at 10 characters]")
    assert out.structured is None


async def test_no_obligations_leave_the_result_untouched() -> None:
    output = ToolOutput(text="t", structured={"a": 1})
    call = make_call(output=output, decision=Decision(allow=True))
    assert (await ObligationsStage().run(call)).output is output


@pytest.mark.parametrize("has_output_schema", [True, False])
async def test_a_cut_result_of_a_tool_with_an_output_schema_is_an_error_result(has_output_schema: bool) -> None:
    # clients validate a tool's structured content against its output schema; a cut result has none,
    # so it must say it is not the tool's result (isError), or the client rejects the whole call
    from server.registry import ToolSpec
    from tests.fakes.backends import FakeTool

    spec = ToolSpec(
        name="fake",
        description="",
        securable="main.tools.fake",
        input_schema={"type": "object"},
        output_schema={"type": "object"} if has_output_schema else None,
    )
    structured = {"text": "x" * 500}
    call = make_call(
        tool=FakeTool(spec=spec),
        output=ToolOutput(text=json.dumps(structured), structured=structured),
        decision=Decision(allow=True, obligations={"max_result_chars": 100}),
    )
    out = (await ObligationsStage().run(call)).output
    assert out is not None
    assert out.structured is None
    assert "[truncated by policy at 100 characters" in out.text
    assert out.is_error is has_output_schema
