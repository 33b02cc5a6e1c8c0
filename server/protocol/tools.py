"""The tools part of the MCP edge: `tools/list` and `tools/call` handlers, from requests to `Call`s and back."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
import structlog
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError
from starlette.requests import Request

from server.audit.traces import new_call_id
from server.auth.middleware import identity_of
from server.call import Call, ClientInfo, RunInfo
from server.errors import AfterInvoke, CastellanError, Denied, InternalError
from server.listing import ToolLister
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.protocol.relay import RecordedError, RelayingCalls
from server.protocol.tasks import TaskCalls, ToolWatch
from server.registry import ToolSpec
from server.request_id import request_id_of
from server.runs import run_info

log = structlog.get_logger("castellan.call")

INSTRUCTIONS = (
    "Castellan governs every tool call: each is checked against catalog grants, Rego policy and "
    "per-agent limits, and audited. A refused call returns isError with a JSON body "
    '{"decision": "deny", "stage": ..., "reasons": [...]}; read the reasons instead of retrying blindly.'
)


def to_tool_result(exc: CastellanError, *, structured: bool = True) -> types.CallToolResult:
    """The one place a refused call becomes an MCP result: `isError` with a machine-readable body.

    The body is always the JSON text content. It is also the structured content unless
    `structured` is false: for a tool that declares an output schema, since some clients (the
    MCP Inspector among them) validate structured content against that schema even on errors.
    """
    body: dict[str, Any] = {
        "decision": exc.verdict,
        "stage": exc.stage,
        "code": exc.code,
        "reasons": list(exc.reasons),
    }
    if isinstance(exc, AfterInvoke):
        body["tool_ran"] = True  # not a refusal: the call was allowed and the tool executed
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(body))],
        structured_content=body if structured else None,
        is_error=True,
    )


def to_mcp_tool(spec: ToolSpec) -> types.Tool:
    return types.Tool(
        name=spec.name,
        title=spec.title,
        description=spec.description,
        input_schema=dict(spec.input_schema),
        output_schema=dict(spec.output_schema) if spec.output_schema is not None else None,
        annotations=types.ToolAnnotations(**spec.annotations) if spec.annotations else None,
    )


def call_result(call: Call) -> types.CallToolResult:
    """The tool's result; a refusal's body; or, for a failure after the tool ran, its result when it
    is final (only the outcome write or the charge failed) and a clear error when it is withheld."""
    returnable = isinstance(call.error, AfterInvoke) and not call.error.withheld and call.output is not None
    if call.error is not None and not returnable:
        has_output_schema = call.tool is not None and call.tool.spec.output_schema is not None
        return to_tool_result(call.error, structured=not has_output_schema)
    output = call.output
    assert output is not None, "an allowed call always has an output"
    content: list[Any] = (
        [dict(block) for block in output.content]
        if output.content
        else [types.TextContent(type="text", text=output.text)]
    )
    return types.CallToolResult(
        content=content,
        structured_content=dict(output.structured) if output.structured is not None else None,
        is_error=output.is_error,
    )


class McpHandlers:
    """`tools/list` through the lister, `tools/call` through the pipeline; both know the caller from
    the identity the HTTP edge verified."""

    def __init__(
        self, lister: ToolLister, pipeline: Pipeline, metrics: Metrics, relaying: RelayingCalls | None = None
    ) -> None:
        self._lister = lister
        self._pipeline = pipeline
        self._metrics = metrics
        self.relaying = relaying
        """Calls that can relay (server.protocol.relay); None: nothing is relayed."""
        self.decided: Callable[[ServerRequestContext[Any, Any], Call], Awaitable[None]] | None = None
        """Told each call's outcome (the gateway's log notification of what it decided: protocol/logging.py)."""
        self.tasks: TaskCalls | None = None
        """Calls that may become tasks (server/protocol/tasks.py); None: none do."""
        # The metrics' children per label values, looked up once (`labels` checks and locks per call).
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._timers: dict[str, Any] = {}

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        request = ctx.request if isinstance(ctx.request, Request) else None
        identity = identity_of(request.scope) if request else None
        specs = await self._lister.visible(identity, request_id_of(request.scope) if request else "")
        return types.ListToolsResult(tools=[to_mcp_tool(s) for s in specs])

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult | dict[str, Any]:
        request = ctx.request if isinstance(ctx.request, Request) else None
        call_id = new_call_id()
        started = time.perf_counter()
        meta = _as_mapping(params.meta) or {}
        tasked = self.relaying is not None and self.tasks is not None and await self._tasked(ctx, params)
        if self.relaying is not None and params.request_state is not None:
            # the next round of a call waiting for the agent (2026-07-28): not a new call
            if tasked:
                return await self._as_task(ctx, params, None, started)
            resumed = await self.relaying.resume(ctx, params)
            if isinstance(resumed, types.InputRequiredResult):
                return resumed
            if self.decided is not None:
                await self.decided(ctx, resumed)
            return self._answer(resumed, started)
        # Whatever the caller sent, and whatever fails while it is handled, the call ends as a recorded
        # refusal: never a JSON-RPC internal error with no decision row.
        try:
            call = Call(
                tool_name=params.name,
                arguments=params.arguments or {},
                identity=identity_of(request.scope) if request else None,
                run=run_info(_as_mapping(params.meta), request.headers if request else None, fallback=call_id),
                call_id=call_id,
                request_id=request_id_of(request.scope) if request else "",
                client=client_of(ctx, request),
            )
        except Exception as exc:
            log.exception("call_unreadable", call_id=call_id)
            error = InternalError("request", f"internal error reading the call ({type(exc).__name__})")
            call = await self._pipeline.refuse(_bare_call(ctx, call_id), error)
        else:
            try:
                if tasked:
                    return await self._as_task(ctx, params, call, started)
                if self.relaying is not None:
                    outcome = await self.relaying.start(ctx, params, call, meta, self._pipeline.run)
                    if isinstance(outcome, types.InputRequiredResult):
                        return outcome
                    call = outcome
                else:
                    call = await self._pipeline.run(call)
            except RecordedError:  # a protocol error for a call already recorded (a missing capability)
                raise
            except Exception as exc:
                log.exception("pipeline_failed", call_id=call_id)
                call = await self._pipeline.refuse(
                    call, InternalError("pipeline", f"internal error ({type(exc).__name__})")
                )
        if self.decided is not None:
            await self.decided(ctx, call)
        return self._answer(call, started)

    async def _tasked(self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> bool:
        """Whether the call may become a task; a tool that needs tasks, from a caller that did not
        declare them, is refused (recorded, then the -32021 protocol error)."""
        assert self.tasks is not None
        try:
            return self.tasks.wanted(ctx, params)
        except MCPError as exc:
            await self.refuse_unread(ctx, Denied("tasks", exc.error.message))
            raise RecordedError(code=exc.error.code, message=exc.error.message, data=exc.error.data) from None

    async def _as_task(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.CallToolRequestParams,
        call: Call | None,
        started: float,
    ) -> types.CallToolResult | types.InputRequiredResult | dict[str, Any]:
        """Run the call (or, `call` None, the next round of a waiting one) so it may become a task: the
        same relay and pipeline, its result kept for `tasks/get` (server/protocol/tasks.py)."""
        relaying, tasks, meta = self.relaying, self.tasks, _as_mapping(params.meta) or {}
        assert relaying is not None
        assert tasks is not None

        watch = ToolWatch() if call is not None else None  # a next round: its tool runs already

        async def run(started: Call) -> Call:
            if watch is not None:
                watch.seen(started.relay)
            return await self._pipeline.run(started)

        async def first() -> Call | types.InputRequiredResult:
            if call is None:
                return await relaying.resume(ctx, params)
            return await relaying.start(ctx, params, call, meta, run)

        async def resume(responses: dict[str, Any], state: str | None) -> Call | types.InputRequiredResult:
            update = {"input_responses": responses, "request_state": state}
            return await relaying.resume(ctx, params.model_copy(update=update))

        async def answer(done: Call) -> types.CallToolResult:
            if self.decided is not None:
                await self.decided(ctx, done)
            return self._answer(done, started)

        # the next round of a waiting call: its call id is known once it ends
        owner = call if call is not None else _bare_call(ctx, "")
        return await tasks.run(ctx, owner, first, resume, answer, watch)

    def _answer(self, call: Call, started: float) -> types.CallToolResult:
        try:
            self._observe(call, time.perf_counter() - started)
            return call_result(call)
        except Exception as exc:  # the call is recorded already; its caller still gets an answer
            log.exception("call_result_failed", call_id=call.call_id)
            return to_tool_result(
                InternalError("result", f"internal error returning the result ({type(exc).__name__})")
            )

    async def refuse_unread(self, ctx: ServerRequestContext[Any, Any], error: CastellanError) -> None:
        """Record a `tools/call` refused before it reached `call_tool` (its params failed validation)."""
        call = await self._pipeline.refuse(_bare_call(ctx, new_call_id()), error)
        self._observe(call, 0.0)

    def _observe(self, call: Call, elapsed: float) -> None:
        error = call.error
        decision = "allow" if error is None else error.verdict
        stage = error.stage if error else "invoke"
        # a known tool keeps its name even when the call stopped before resolving it (bad arguments);
        # only names that no tool has are folded, so a caller cannot mint label values
        tool = call.tool_name if call.tool is not None or self._lister.knows(call.tool_name) else "(unknown)"
        counter = self._counters.get((tool, decision, stage))
        if counter is None:
            if len(self._counters) >= _CHILDREN:  # the values are bounded already; so is what is remembered
                self._counters.clear()
            counter = self._counters[tool, decision, stage] = self._metrics.calls.labels(tool, decision, stage)
        counter.inc()
        timer = self._timers.get(tool)
        if timer is None:
            if len(self._timers) >= _CHILDREN:
                self._timers.clear()
            timer = self._timers[tool] = self._metrics.call_seconds.labels(tool)
        timer.observe(elapsed)
        log.info(
            "tool_call",
            call_id=call.call_id,
            request_id=call.request_id,
            agent_id=call.identity.agent_id if call.identity else None,
            tool=call.tool_name[:128],
            run_id=call.run.run_id,
            decision=decision,
            stage=stage,
            reasons=list(error.reasons) if error else None,
            ignored=list(call.run.ignored) or None,
            tool_error=call.output.is_error if call.output else None,
            policy_version=call.decision.policy_version if call.decision else None,
            ms=round(elapsed * 1000, 3),
        )


_CHILDREN = 4096


class UnreadCallRecorder(ServerMiddleware[Any]):
    """A `tools/call` whose params the SDK refuses before any handler runs (a progress token that is
    an object, `_meta` that is a list, ...) is recorded as a denial too, and its error names the
    offending fields (not their values: those are the caller's input)."""

    def __init__(self, handlers: McpHandlers) -> None:
        self._handlers = handlers

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call" or ctx.request_id is None:
            return await call_next(ctx)
        try:
            return await call_next(ctx)
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"][:3]) or "params" for e in exc.errors()})
            reason = f"invalid tools/call params: {', '.join(fields[:5])}"[:300]
            await self._handlers.refuse_unread(ctx, Denied("request", reason))
            raise MCPError(code=types.INVALID_PARAMS, message="Invalid request parameters", data=reason) from None
        except RecordedError:
            raise
        except MCPError as exc:
            await self._handlers.refuse_unread(ctx, Denied("request", f"refused by the MCP layer: {exc.error.message}"))
            raise


def _described(value: Any) -> str:
    """A client-supplied description, bounded and printable (it ends up in the audit trail and logs)."""
    text = value[:256] if isinstance(value, str) else ""
    return text if text.isprintable() else "".join(c if c.isprintable() else "\ufffd" for c in text)


def client_of(ctx: ServerRequestContext[Any, Any], request: Request | None) -> ClientInfo:
    """The client's `clientInfo` (from `initialize`, or the 2026-07-28 request envelope), its user agent and
    the connection's address. Never raises: a client that says nothing, or nonsense, is recorded as such."""
    try:
        info = getattr(getattr(ctx.session, "client_params", None), "client_info", None)
        peer = request.client if request is not None else None
        return ClientInfo(
            name=_described(getattr(info, "name", "")),
            version=_described(getattr(info, "version", "")),
            user_agent=_described(request.headers.get("user-agent", "") if request is not None else ""),
            address=f"{peer.host}:{peer.port}" if peer is not None else "",
        )
    except Exception:
        return ClientInfo()


def _bare_call(ctx: ServerRequestContext[Any, Any], call_id: str) -> Call:
    """What can be said for certain about a call whose request could not be read: who sent it, the
    tool name if it is a string, the arguments if they are an object."""
    request = ctx.request if isinstance(ctx.request, Request) else None
    raw = ctx.params if isinstance(ctx.params, dict) else {}
    name, arguments = raw.get("name"), raw.get("arguments")
    return Call(
        tool_name=name[:256] if isinstance(name, str) else "(unreadable)",
        arguments=arguments if isinstance(arguments, dict) else {},
        identity=identity_of(request.scope) if request else None,
        run=RunInfo(run_id=call_id),
        call_id=call_id,
        request_id=request_id_of(request.scope) if request else "",
        client=client_of(ctx, request),
    )


def _as_mapping(meta: object) -> dict[str, Any] | None:
    """`_meta` as a plain dict, whichever shape the SDK hands over for the protocol era."""
    if meta is None:
        return None
    if isinstance(meta, dict):
        return meta
    dump = getattr(meta, "model_dump", None)
    return dict(dump(by_alias=True)) if callable(dump) else None
