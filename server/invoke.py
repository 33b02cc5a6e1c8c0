"""Pipeline stage 5, invoke: run the tool, turn its failures into error results."""

from __future__ import annotations

from dataclasses import replace

import anyio
import structlog

from server.call import Call
from server.registry import ToolOutput

log = structlog.get_logger("castellan.invoke")


class InvokeStage:
    """Runs the tool with a timeout. A tool that raises or times out gives an `isError` result
    with a short message (no traceback goes to the agent); the call still gets charged and audited."""

    name = "invoke"

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds

    async def run(self, call: Call) -> Call:
        assert call.tool is not None
        spec = call.tool.spec
        try:
            with anyio.fail_after(self._timeout):
                output = await call.tool.invoke(call.arguments)
        except TimeoutError:
            output = ToolOutput(text=f"tool {spec.name} timed out after {self._timeout:g}s", is_error=True)
        except Exception as exc:
            log.warning("tool_failed", tool=spec.name, call_id=call.call_id, error=repr(exc))
            output = ToolOutput(text=f"tool {spec.name} failed: {type(exc).__name__}: {exc}"[:2000], is_error=True)
        return replace(call, output=output)
