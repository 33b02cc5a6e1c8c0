from __future__ import annotations

import json

from server.errors import Denied, InternalError
from server.protocol.tools import call_result, to_tool_result
from server.registry import ToolOutput
from tests.fakes.backends import make_call


def test_a_denial_is_an_error_result_with_a_machine_readable_body() -> None:
    result = to_tool_result(Denied("grants", "missing privilege EXECUTE on main.tools.x"))
    body = {
        "decision": "deny",
        "stage": "grants",
        "code": "denied",
        "reasons": ["missing privilege EXECUTE on main.tools.x"],
    }
    assert result.is_error
    assert result.structured_content == body
    assert json.loads(result.content[0].text) == body  # type: ignore[union-attr]


def test_an_internal_error_says_error_not_deny() -> None:
    result = to_tool_result(InternalError("policy", "internal error in policy (KeyError)"))
    assert result.structured_content is not None
    assert result.structured_content["decision"] == "error"


def test_an_allowed_call_returns_the_tool_output() -> None:
    result = call_result(make_call(output=ToolOutput(text="42", structured={"answer": 42})))
    assert not result.is_error
    assert result.structured_content == {"answer": 42}


def test_a_denial_of_a_tool_with_an_output_schema_keeps_the_body_in_text_only() -> None:
    from server.errors import Denied as D
    from tools.echo import EchoTool

    result = call_result(make_call(tool=EchoTool(), error=D("policy", "too long")))
    assert result.is_error
    assert result.structured_content is None
    assert json.loads(result.content[0].text)["reasons"] == ["too long"]  # type: ignore[union-attr]
