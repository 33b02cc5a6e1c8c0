"""The tasks part of the MCP edge (`io.modelcontextprotocol/tasks`, SEP-2663, 2026-07-28): a `tools/call`
to a tool that supports tasks becomes a task the caller polls, and `tasks/get`, `tasks/update` and
`tasks/cancel` serve it.

- The governed call runs once, in a task of its own, through the same pipeline and relay as any call
  (grants, policy, metering, its own decision and outcome records); the task only holds its result.
- A task belongs to the identity that started it (issuer, subject and agent). For anyone else it does
  not exist: `tasks/get`, `tasks/update` and `tasks/cancel` answer them as for an unknown task.
- Its lifetime is bounded (`tasks.default_ttl_seconds`, at most `tasks.max_ttl_seconds`): a task
  still running when it expires is cancelled. Its creation, its end and a cancel are audited.
- A call that waits for the agent inside a task (the relay's `input_required` rounds) shows as
  `input_required` with its `inputRequests`; `tasks/update` answers them, and the call goes on.
- Only a caller that declared the extension (for the session, or in the request's `_meta`) gets a
  task; for any other a tool that supports tasks runs as a plain call, and one that requires them
  is refused with -32021 (missing required client capability).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
import structlog
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types.jsonrpc import HEADER_MISMATCH, MISSING_REQUIRED_CLIENT_CAPABILITY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field
from starlette.requests import Request

from server.auth.middleware import identity_of
from server.call import Call, ClientInfo
from server.errors import BackendUnavailable
from server.identity import Identity
from server.protocol.relay import principal_of
from server.registry import ToolRegistry
from server.relay.needed import CLIENT_CAPABILITIES_META_KEY
from server.settings import TasksSettings
from server.tasks.audit import TaskAudit
from server.tasks.store import MemoryTaskStore, Task, TaskLimit, TaskStore
from server.tasks.support import TASKS_EXTENSION

log = structlog.get_logger("castellan.tasks")
_CLOSE_SECONDS = 10.0
_POLL_SECONDS = 0.02
_BEFORE_TOOL = 10
"""The stages before the tool (an approval that waits, say) count once they take this many windows."""


class ToolWatch:
    """What the window before a call becomes a task watches: the call's relay, once the pipeline has
    it (`seen`). The tool has started once the relay is bound to the call (the invoke stage binds it);
    it is asking the agent while the relay decides a request."""

    def __init__(self) -> None:
        self.relay: Any = None

    def seen(self, relay: Any) -> None:
        self.relay = relay

    def started(self) -> bool:
        return self.relay is not None and getattr(self.relay, "call", None) is not None

    def asking(self) -> bool:
        return self.relay is not None and getattr(self.relay, "deciding", 0) > 0


First = Callable[[], Awaitable[Call | types.InputRequiredResult]]
Resume = Callable[[dict[str, Any], str | None], Awaitable[Call | types.InputRequiredResult]]
Answer = Callable[[Call], Awaitable[types.CallToolResult]]


class TaskIdParams(types.RequestParams):
    task_id: str = Field(alias="taskId")


class TaskUpdateParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(alias="inputResponses")


@dataclass
class _Running:
    """A task's work in this process: what it needs to go on, and who started it."""

    task: Task
    worker: asyncio.Task[None] | None
    identity: Identity | None
    run_id: str
    expired: bool = False
    given: dict[str, Any] = field(default_factory=dict)
    """Answers `tasks/update` delivered that the call has not taken yet, by request key."""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    expiry: asyncio.TimerHandle | None = None


def declared_tasks(ctx: ServerRequestContext[Any, Any], params: object) -> bool:
    """Whether the caller declared the extension: for its session, or in this request's `_meta`."""
    try:
        capabilities = ctx.session.client_capabilities
    except Exception:
        capabilities = None
    extensions = getattr(capabilities, "extensions", None)
    if isinstance(extensions, Mapping) and TASKS_EXTENSION in extensions:
        return True
    meta = getattr(params, "meta", None)
    meta = meta if isinstance(meta, Mapping) else getattr(meta, "__dict__", None)
    envelope = meta.get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, Mapping) else None
    if envelope is not None and hasattr(envelope, "model_dump"):
        envelope = envelope.model_dump(by_alias=True, exclude_none=True)
    extensions = envelope.get("extensions") if isinstance(envelope, Mapping) else None
    return isinstance(extensions, Mapping) and TASKS_EXTENSION in extensions


def _missing_extension(what: str) -> MCPError:
    return MCPError(
        code=MISSING_REQUIRED_CLIENT_CAPABILITY,
        message=f"{what} needs the client to declare the {TASKS_EXTENSION} extension",
        data={"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}},
    )


def _unknown(task_id: str) -> MCPError:
    # the same answer for a task that never was, has expired, or is someone else's
    return MCPError(code=types.INVALID_PARAMS, message="Unknown task", data={"taskId": task_id[:256]})


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {k: _dump(v) for k, v in value.items()}
    return value


class TaskCalls:
    """Runs the calls that become tasks and serves the task methods. `store` keeps the tasks (the
    embedded default is this process's memory: server/tasks/store.py)."""

    def __init__(
        self, settings: TasksSettings, registry: ToolRegistry, audit: TaskAudit, store: TaskStore | None = None
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._audit = audit
        self._store = store or MemoryTaskStore(settings.max_tasks, settings.max_tasks_per_identity)
        self._running: dict[str, _Running] = {}
        self._ending: set[asyncio.Future[None]] = set()

    def attach(self, server: Server[Any]) -> None:
        """Serve the task methods and declare the extension (2026-07-28 only; the 2025-era task
        methods, `tasks/list` and `tasks/result`, are not served)."""
        server.extensions[TASKS_EXTENSION] = {}
        server.add_request_handler("tasks/get", TaskIdParams, self.get)
        server.add_request_handler("tasks/update", TaskUpdateParams, self.update)
        server.add_request_handler("tasks/cancel", TaskIdParams, self.cancel)

    def support(self, tool_name: str) -> str:
        """The tool's task support: "forbidden" (the default), "optional" or "required"."""
        tool = self._registry.get(tool_name)
        support = getattr(tool.spec, "task_support", "forbidden") if tool is not None else "forbidden"
        return support if support in ("optional", "required") else "forbidden"

    def wanted(self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> bool:
        """Whether this call runs as a task. Raises `MCPError` (-32021) for a tool that requires tasks
        when the caller did not declare the extension."""
        support = self.support(params.name)
        version = getattr(ctx, "protocol_version", None)  # None: the edge's lean path, 2026-07-28 only
        if support == "forbidden" or (version is not None and version not in MODERN_PROTOCOL_VERSIONS):
            return False
        if declared_tasks(ctx, params):
            # a task is found by its starter's identity: without one it could never be polled
            request = ctx.request if isinstance(ctx.request, Request) else None
            return request is not None and identity_of(request.scope) is not None
        if support == "required":
            raise _missing_extension(f"tool {params.name[:128]}")
        return False

    async def run(
        self,
        ctx: ServerRequestContext[Any, Any],
        call: Call,
        first: First,
        resume: Resume,
        answer: Answer,
        watch: ToolWatch | None = None,
    ) -> types.CallToolResult | types.InputRequiredResult | dict[str, Any]:
        """Start the call; if its tool answers, or asks the agent something, within
        `promote_after_seconds` of starting, answer as a plain call would (SEP-2663's immediate
        result; an input round stays a plain round, and its next round may become the task).
        Otherwise the call becomes a task: its creation is audited durably before the caller hears
        of it, and the `CreateTaskResult` is answered. When the task cannot be kept (the store is
        full, its record cannot be written) the call goes on as a plain call.

        `watch` tells when the tool started (the stages before it, under load, do not count) and
        whether it is asking the agent something; without it the window counts from now."""
        work: asyncio.Task[Call | types.InputRequiredResult] = asyncio.ensure_future(first())
        try:
            await self._window(work, watch)
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.wait({work})
            raise
        if not work.done():
            created = await self._create(call, work, resume, answer)
            if created is not None:
                return created
        outcome = await work
        return outcome if isinstance(outcome, types.InputRequiredResult) else await answer(outcome)

    async def _window(self, work: asyncio.Task[Any], watch: ToolWatch | None) -> None:
        window = self._settings.promote_after_seconds
        if window <= 0:
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        started = began if watch is None else None
        while not work.done():
            now = loop.time()
            if started is None and (watch is None or watch.started() or now - began > _BEFORE_TOOL * window):
                started = now
            if started is not None and now - started >= window and not (watch is not None and watch.asking()):
                return
            await asyncio.wait({work}, timeout=min(window, _POLL_SECONDS))

    async def _create(
        self, call: Call, work: asyncio.Task[Call | types.InputRequiredResult], resume: Resume, answer: Answer
    ) -> dict[str, Any] | None:
        ttl = min(self._settings.default_ttl_seconds, self._settings.max_ttl_seconds)
        task = Task(
            task_id=secrets.token_urlsafe(18),
            owner=principal_of(call.identity),
            tool=call.tool_name,
            ttl_seconds=ttl,
            poll_interval_ms=self._settings.poll_interval_ms,
            call_id=call.call_id or None,
        )
        try:
            self._store.add(task)
        except TaskLimit as exc:
            log.warning("task_refused", call_id=call.call_id, reason=str(exc))
            return None
        running = _Running(task=task, worker=None, identity=call.identity, run_id=call.run.run_id)
        self._running[task.task_id] = running
        try:
            await self._audit.created(task, call.identity, call.run.run_id, call.client)
        except BackendUnavailable as exc:  # no task without its record: the call goes on as a plain call
            log.warning("task_refused", call_id=call.call_id, reason="; ".join(exc.reasons))
            self._forget(task.task_id)
            return None
        running.worker = asyncio.get_running_loop().create_task(
            self._work(task.task_id, running, work, resume, answer), name=f"task-{task.task_id}"
        )
        running.worker.add_done_callback(lambda worker: self._ended(task.task_id, running, work, worker))
        running.expiry = asyncio.get_running_loop().call_later(ttl, self._expire, task.task_id)
        log.info("task_created", task_id=task.task_id, call_id=call.call_id, tool=call.tool_name[:128], ttl_s=ttl)
        return {"resultType": "task", **task.envelope()}

    async def _work(
        self,
        task_id: str,
        running: _Running,
        work: asyncio.Task[Call | types.InputRequiredResult],
        resume: Resume,
        answer: Answer,
    ) -> None:
        state: str | None = None
        try:
            outcome = await work  # a cancel here reaches the call, and the relay stops it
            while isinstance(outcome, types.InputRequiredResult):
                state = outcome.request_state
                requests = {k: _dump(v) for k, v in (outcome.input_requests or {}).items()}
                unanswered = {k: v for k, v in requests.items() if k not in running.given}
                if unanswered:
                    self._move(task_id, "input_required", input_requests=unanswered)
                while not running.given.keys() & requests.keys():
                    running.arrived.clear()
                    await running.arrived.wait()
                responses = {k: running.given.pop(k) for k in list(requests) if k in running.given}
                # while it resumes, a cancel is the relay's to handle (it stops the call)
                resumed, state = state, None
                outcome = await resume(responses, resumed)
            result = await answer(outcome)
            error = outcome.relay.upstream_error if outcome.relay is not None else None
            if error is not None:  # the upstream answered a protocol error: the task failed
                self._move(task_id, "failed", error=_dump(error), call_id=outcome.call_id)
            else:
                self._move(task_id, "completed", result=_dump(result), call_id=outcome.call_id)
        except asyncio.CancelledError:
            if state is not None:  # the call waits for the agent: stop it (it is recorded as cancelled)
                await self._abandon(resume, state)
            how = "expired: its lifetime ended" if running.expired else "the task was cancelled"
            self._move(task_id, "cancelled", status_message=how)
        except MCPError as exc:
            self._move(task_id, "failed", error=_dump(exc.error))
        except Exception as exc:
            log.exception("task_failed", task_id=task_id)
            error = types.ErrorData(code=types.INTERNAL_ERROR, message=f"internal error ({type(exc).__name__})")
            self._move(task_id, "failed", error=_dump(error))

    def _ended(
        self,
        task_id: str,
        running: _Running,
        work: asyncio.Task[Call | types.InputRequiredResult],
        worker: asyncio.Task[None],
    ) -> None:
        """The task's work is over: audit how it ended. A worker cancelled before it ever ran leaves
        its call to be stopped here."""
        if worker.cancelled():
            work.cancel()  # the relay stops the call, and its pipeline records it as cancelled
            how = "expired: its lifetime ended" if running.expired else "the task was cancelled"
            self._move(task_id, "cancelled", status_message=how)
        if running.expiry is not None:
            running.expiry.cancel()
        self._running.pop(task_id, None)
        ending = "expired" if running.expired else None
        ended = self._audit.ended(running.task, running.identity, running.run_id, ending)
        audit = asyncio.ensure_future(self._audited(ended))
        self._ending.add(audit)
        audit.add_done_callback(self._ending.discard)

    @staticmethod
    async def _abandon(resume: Resume, state: str) -> None:
        """Cancel a call parked between input rounds: resume its round, then cancel that resumption,
        which stops the call as the relay stops any call whose agent went away."""
        stop = asyncio.ensure_future(resume({}, state))
        for _ in range(3):
            await asyncio.sleep(0)
        stop.cancel()
        try:
            await stop
        except (asyncio.CancelledError, MCPError):
            pass
        except Exception:
            log.exception("task_abandon_failed")

    def _move(self, task_id: str, status: Any, **changes: Any) -> None:
        running = self._running.get(task_id)
        if running is None:
            return
        current = self._store.get(task_id, running.task.owner) or running.task
        running.task = current.moved(status, **changes)
        self._store.put(running.task)

    def _expire(self, task_id: str) -> None:
        running = self._running.get(task_id)
        if running is None or running.worker is None:
            return
        log.info("task_expired", task_id=task_id)
        running.expired = True
        running.worker.cancel()

    def _forget(self, task_id: str) -> None:
        self._running.pop(task_id, None)
        self._store.drop(task_id)

    @staticmethod
    async def _audited(write: Awaitable[None]) -> None:
        try:
            await write
        except BackendUnavailable:
            log.error("task_audit_failed")

    # The task methods. Each finds the task for its caller only.

    def _find(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> tuple[Task, Identity | None]:
        if getattr(ctx, "protocol_version", None) not in MODERN_PROTOCOL_VERSIONS:
            raise MCPError(code=types.METHOD_NOT_FOUND, message="Method not found", data=ctx.method)
        if not declared_tasks(ctx, params):
            raise _missing_extension(ctx.method)
        request = ctx.request if isinstance(ctx.request, Request) else None
        if request is not None:
            named = request.headers.get(MCP_NAME_HEADER)
            if named is not None and decode_header_value(named) != params.task_id:
                raise MCPError(code=HEADER_MISMATCH, message=f"{MCP_NAME_HEADER} header does not match taskId")
        identity = identity_of(request.scope) if request is not None else None
        task = self._store.get(params.task_id, principal_of(identity)) if identity is not None else None
        if task is None:
            raise _unknown(params.task_id)
        return task, identity

    async def get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        task, _ = self._find(ctx, params)
        return task.detailed()

    async def update(self, ctx: ServerRequestContext[Any, Any], params: TaskUpdateParams) -> dict[str, Any]:
        """Answer some or all of a waiting task's requests; the task stays `input_required` until every
        request is answered. Unknown keys are ignored. Acked with an empty result."""
        task, _ = self._find(ctx, params)
        running = self._running.get(task.task_id)
        answered = {k: v for k, v in params.input_responses.items() if k in task.input_requests}
        if task.status != "input_required" or running is None or not answered:
            return {}
        pending = {k: v for k, v in task.input_requests.items() if k not in answered}
        # the next tasks/get shows only what is still pending, before the call has even resumed
        running.task = task.moved("input_required" if pending else "working", input_requests=pending)
        self._store.put(running.task)
        running.given.update(answered)
        running.arrived.set()
        return {}

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        """Cancel a running task (acked with an empty result; the next `tasks/get` says `cancelled`).
        A task that has ended already is acked the same way, and left as it ended."""
        task, identity = self._find(ctx, params)
        running = self._running.get(task.task_id)
        if task.terminal or running is None or running.worker is None:
            return {}
        running.task = task.moved("cancelled", status_message="cancelled by its caller")
        self._store.put(running.task)
        request = ctx.request if isinstance(ctx.request, Request) else None
        agent = request.headers.get("user-agent", "")[:256] if request is not None else ""
        client = ClientInfo(user_agent=agent)
        await self._audited(self._audit.cancelled(task, identity, running.run_id, client))
        running.worker.cancel()
        log.info("task_cancelled", task_id=task.task_id)
        return {}

    async def close(self) -> None:
        """Cancel every running task (the gateway is stopping) and wait, at most `_CLOSE_SECONDS`, for
        their calls to stop and their ends to be audited (before the audit outbox closes)."""
        timeout = _CLOSE_SECONDS
        workers = [r.worker for r in self._running.values() if r.worker is not None]
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.wait(workers, timeout=timeout)
        await asyncio.sleep(0)  # the done callbacks schedule the end records
        if self._ending:
            await asyncio.wait(set(self._ending), timeout=timeout)

    def __len__(self) -> int:
        return len(self._store)
