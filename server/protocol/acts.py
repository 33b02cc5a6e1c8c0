"""Governed acts other than `tools/call` (a read, a prompt, a completion): from an MCP request to a `Call`
through a pipeline, and a refusal to the JSON-RPC error those methods answer with."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import mcp_types as types
import structlog
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from starlette.requests import Request

from server.audit.traces import new_call_id
from server.auth.middleware import identity_of
from server.call import Action, Call
from server.errors import AfterInvoke, CastellanError, InternalError, NotFound
from server.identity import Identity
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.protocol.logging import LogLevels
from server.protocol.relay import RecordedError, RelayingCalls, RoundParams
from server.protocol.tools import _as_mapping, client_of
from server.registry import Tool, ToolOutput
from server.request_id import request_id_of
from server.runs import run_info

log = structlog.get_logger("castellan.call")

DENIED = -32003
"""The JSON-RPC error code of a refused read, prompt or completion (these methods have no error
result, unlike `tools/call`); `data` holds the same body as a refused tool call's result."""


def caller_of(ctx: ServerRequestContext[Any, Any]) -> tuple[Request | None, Identity | None, str]:
    """The HTTP request, the identity the edge verified, and the request id."""
    request = ctx.request if isinstance(ctx.request, Request) else None
    identity = identity_of(request.scope) if request else None
    return request, identity, request_id_of(request.scope) if request else ""


def denial_body(exc: CastellanError) -> dict[str, Any]:
    return {"decision": exc.verdict, "stage": exc.stage, "code": exc.code, "reasons": list(exc.reasons)}


def to_mcp_error(exc: CastellanError, **data: Any) -> MCPError:
    """A refused act as a JSON-RPC error: not found is invalid params (SEP-2164), naming what was
    asked for in `data`; any other refusal `DENIED` with the reasons."""
    body = {**data, **denial_body(exc)}
    if isinstance(exc, NotFound):
        return MCPError(code=types.INVALID_PARAMS, message="; ".join(exc.reasons), data=body)
    if exc.verdict == "error":
        return MCPError(code=types.INTERNAL_ERROR, message="; ".join(exc.reasons), data=body)
    return MCPError(code=DENIED, message=f"denied by the gateway ({exc.stage}): {'; '.join(exc.reasons)}", data=body)


class Acts:
    """Runs a governed act through its pipeline; whatever fails while it is handled, the act ends as a
    recorded refusal (never a JSON-RPC internal error with no decision row). With `relaying`, a read or
    a prompt can ask the agent things while it runs (`run_relaying`), as a tool call can."""

    def __init__(
        self, metrics: Metrics, levels: LogLevels | None = None, relaying: RelayingCalls | None = None
    ) -> None:
        self._metrics = metrics
        self._levels = levels
        self.relaying = relaying

    def _call(
        self,
        ctx: ServerRequestContext[Any, Any],
        action: Action,
        name: str,
        arguments: Mapping[str, Any],
        meta: object,
        tool: Tool | None,
    ) -> Call:
        request, identity, request_id = caller_of(ctx)
        call_id = new_call_id()
        return Call(
            tool_name=name[:1024],
            arguments=dict(arguments),
            identity=identity,
            run=run_info(_as_mapping(meta), request.headers if request else None, fallback=call_id),
            action=action,
            call_id=call_id,
            request_id=request_id,
            client=client_of(ctx, request),
            tool=tool,
        )

    async def run(
        self,
        pipeline: Pipeline,
        ctx: ServerRequestContext[Any, Any],
        *,
        action: Action,
        name: str,
        arguments: Mapping[str, Any],
        meta: object = None,
        tool: Tool | None = None,
    ) -> Call:
        """`tool`: a target the edge resolved already (a completion's); the resolve stage checks it."""
        started = time.perf_counter()
        call = self._call(ctx, action, name, arguments, meta, tool)
        try:
            call = await pipeline.run(call)
        except Exception as exc:
            log.exception("pipeline_failed", call_id=call.call_id, action=action)
            call = await pipeline.refuse(call, InternalError("pipeline", f"internal error ({type(exc).__name__})"))
        return await self._done(ctx, call, started)

    async def run_relaying(
        self,
        pipeline: Pipeline,
        ctx: ServerRequestContext[Any, Any],
        params: RoundParams,
        *,
        action: Action,
        name: str,
        arguments: Mapping[str, Any],
    ) -> Call | types.InputRequiredResult:
        """The act, able to relay what its upstream asks to the agent: on a 2025 session as requests on
        the act's stream; on 2026-07-28 as `input_required` results whose sealed `requestState` the
        agent's retry (`params.request_state`) brings back to the same running pipeline. Each relayed
        request is a decision of its own (`server.relay`)."""
        relaying = self.relaying
        if relaying is None:
            return await self.run(pipeline, ctx, action=action, name=name, arguments=arguments, meta=params.meta)
        started = time.perf_counter()
        if params.request_state is not None:  # the next round of an act waiting for the agent
            resumed = await relaying.resume(ctx, params)
            return (
                resumed if isinstance(resumed, types.InputRequiredResult) else await self._done(ctx, resumed, started)
            )
        call = self._call(ctx, action, name, arguments, params.meta, None)
        try:
            outcome = await relaying.start(ctx, params, call, _as_mapping(params.meta) or {}, pipeline.run)
        except RecordedError:  # a protocol error for an act recorded already (a missing capability)
            raise
        except Exception as exc:
            log.exception("pipeline_failed", call_id=call.call_id, action=action)
            outcome = await pipeline.refuse(call, InternalError("pipeline", f"internal error ({type(exc).__name__})"))
        if isinstance(outcome, types.InputRequiredResult):
            return outcome
        return await self._done(ctx, outcome, started)

    async def _done(self, ctx: ServerRequestContext[Any, Any], call: Call, started: float) -> Call:
        self._observe(call, time.perf_counter() - started)
        if self._levels is not None:
            await self._levels.decided(ctx, call)
        return call

    def _observe(self, call: Call, elapsed: float) -> None:
        error = call.error
        decision = "allow" if error is None else error.verdict
        stage = error.stage if error else "invoke"
        label = f"{call.action}:{call.tool.spec.name}" if call.tool is not None else f"{call.action}:(unknown)"
        self._metrics.calls.labels(label, decision, stage).inc()
        self._metrics.call_seconds.labels(label).observe(elapsed)
        log.info(
            "governed_act",
            action=call.action,
            call_id=call.call_id,
            request_id=call.request_id,
            agent_id=call.identity.agent_id if call.identity else None,
            target=call.tool_name[:256],
            run_id=call.run.run_id,
            decision=decision,
            stage=stage,
            reasons=list(error.reasons) if error else None,
            policy_version=call.decision.policy_version if call.decision else None,
            ms=round(elapsed * 1000, 3),
        )


def source_error(output: ToolOutput, **data: Any) -> MCPError:
    """The act ran and its source answered with an error (an unknown URI under a template, bad prompt
    arguments), or it failed or timed out: the agent gets the source's code and message."""
    said = (output.structured or {}).get("source_error") or {}
    code: int = said["code"] if isinstance(said.get("code"), int) else types.INTERNAL_ERROR
    return MCPError(code=code, message=str(said.get("message") or output.text)[:500], data=data)


def returnable(call: Call) -> bool:
    """The act's output goes back: it was allowed, or it ran and only the outcome write or charge failed."""
    if call.error is None:
        return call.output is not None
    return isinstance(call.error, AfterInvoke) and not call.error.withheld and call.output is not None
