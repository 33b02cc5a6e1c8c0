"""Pipeline stage 5, invoke: run the tool, turn its failures into error results."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

import structlog

from server.call import Call
from server.identity import Identity
from server.registry import ToolOutput
from server.relay.relay import CallCancelled, active_relay

log = structlog.get_logger("castellan.invoke")

caller: ContextVar[Identity | None] = ContextVar("castellan_caller", default=None)
"""The identity whose call a tool is running (tools that share workers fairly between agents read it)."""


class InvokeStage:
    """Runs the tool with a timeout. A tool that raises or times out gives an `isError` result
    with a short message (no traceback goes to the agent); the call still gets charged and audited."""

    name = "invoke"
    waits = True  # on the tool: the call is not counted as worked on meanwhile (server/in_flight)

    def __init__(self, timeout_seconds: float) -> None:
        self._timeout = timeout_seconds

    async def run(self, call: Call) -> Call:
        assert call.tool is not None
        spec = call.tool.spec
        bound = caller.set(call.identity)
        relaying = active_relay.set(call.relay.bind(call) if call.relay is not None else None)
        try:
            # asyncio's own timeout: an anyio cancel scope costs ~3x as much to enter and leave, per call
            async with asyncio.timeout(self._timeout):
                work = call.tool.invoke(call.arguments)
                # with a relay the agent can cancel the call (notifications/cancelled): the tool stops
                stoppable = call.relay is not None and call.relay.stoppable
                output = await (call.relay.cancellable(work) if stoppable and call.relay is not None else work)
        except CallCancelled:
            output = ToolOutput(text=f"tool {spec.name} was stopped: the agent cancelled the call", is_error=True)
        except TimeoutError:
            output = ToolOutput(text=f"tool {spec.name} timed out after {self._timeout:g}s", is_error=True)
        except Exception as exc:
            log.warning("tool_failed", tool=spec.name, call_id=call.call_id, error=repr(exc))
            output = ToolOutput(text=f"tool {spec.name} failed: {type(exc).__name__}: {exc}"[:2000], is_error=True)
        finally:
            active_relay.reset(relaying)
            caller.reset(bound)
            if call.relay is not None:
                call.relay.unbind()
        return call.evolve(output=output)
