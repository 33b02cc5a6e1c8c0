"""Every refusal has its decision row, whatever failed: reading the request, a stage, a stop handler,
or building the audit record itself."""

from __future__ import annotations

from typing import Any

import pytest

from server.audit.stage import DenialRecorder
from server.call import Call
from server.errors import Denied
from server.metrics import Metrics
from server.pipeline import Pipeline
from tests.fakes.backends import MemoryOutbox, make_call

pytestmark = pytest.mark.anyio


class Deny:
    name = "grants"

    async def run(self, call: Call) -> Call:
        raise Denied(self.name, "missing privilege EXECUTE on main.tools.fake")


async def broken_handler(call: Call) -> None:
    raise RuntimeError("meter gone")


async def test_a_failing_stop_handler_does_not_keep_the_denial_from_the_record() -> None:
    outbox = MemoryOutbox()
    pipeline = Pipeline([Deny()], Metrics(), on_stop=[broken_handler, DenialRecorder(outbox)])
    call = await pipeline.run(make_call())
    assert call.error is not None
    assert outbox.kinds(call.call_id) == ["decision"]


async def test_a_record_that_cannot_be_built_is_still_written_bare(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.audit.stage as stage

    def explode(call: Call, redactor: Any) -> dict[str, Any]:
        raise TypeError("unrecordable argument")

    monkeypatch.setattr(stage, "decision_record", explode)
    outbox = MemoryOutbox()
    call = await Pipeline([Deny()], Metrics(), on_stop=[DenialRecorder(outbox)]).run(make_call())
    ((kind, call_id, record),) = outbox.records
    assert (kind, call_id) == ("decision", call.call_id)
    assert record["decision"] == "deny"
    assert record["reasons"] == ["missing privilege EXECUTE on main.tools.fake"]


async def test_a_call_whose_request_cannot_be_read_is_refused_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything in the handler before the pipeline (here: reading the run) failing is an internal
    error that is recorded, not a JSON-RPC internal error with no row."""
    import mcp_types as types

    import server.protocol.tools as edge
    from server.listing import ToolLister

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    monkeypatch.setattr(edge, "run_info", explode)
    outbox = MemoryOutbox()
    pipeline = Pipeline([Deny()], Metrics(), on_stop=[DenialRecorder(outbox)])
    handlers = edge.McpHandlers(ToolLister.__new__(ToolLister), pipeline, Metrics())

    class Ctx:
        request = None
        params = {"name": "echo", "arguments": {"text": "hi"}}

    result = await handlers.call_tool(Ctx(), types.CallToolRequestParams(name="echo", arguments={"text": "hi"}))  # type: ignore[arg-type]
    assert result.is_error
    ((kind, _, record),) = outbox.records
    assert kind == "decision"
    assert (record["decision"], record["stage"], record["tool"]) == ("error", "request", "echo")
    assert record["reasons"] == ["internal error reading the call (ValueError)"]
