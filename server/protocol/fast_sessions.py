"""The 2025-era sessions the edge's lean path may serve: a request's session found exactly as the SDK's
session manager finds it, with the state the SDK keeps for it (its connection: the negotiated version,
the client's info and capabilities), and the lean path's requests that the client may cancel.

A plain `tools/call` or `tools/list` on an existing, initialized 2025-11-25 or 2025-06-18 session (JSON
responses) then skips the transport's memory streams, the dispatcher's task and the runner's context.
Whatever the SDK would answer differently — no session id, an unknown or expired one, a session of
another credential, one being torn down or past its idle timeout, one whose handshake did not complete
through the SDK, stateless mode — is left to the SDK (`find` returns None, the body is replayed).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.jsonrpc_dispatcher import cancelled_request_id_from_params
from starlette.types import Scope

SESSION_VERSIONS = frozenset({"2025-11-25", "2025-06-18"})
"""The handshake versions the lean path serves (older ones, and anything else, are the SDK's)."""

T = TypeVar("T")


class SessionConnections(ServerMiddleware[Any]):
    """Learns each 2025-era session's connection from the SDK itself: the `notifications/initialized`
    that completes its handshake passes the SDK's middleware chain with the connection on its context.
    Held weakly: a session that ends is forgotten with its connection."""

    def __init__(self) -> None:
        self._by_id: weakref.WeakValueDictionary[str, Connection] = weakref.WeakValueDictionary()

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "notifications/initialized":
            connection = getattr(ctx.session, "_connection", None)
            session_id = getattr(connection, "session_id", None)
            if isinstance(connection, Connection) and isinstance(session_id, str):
                self._by_id[session_id] = connection
        return await call_next(ctx)

    def get(self, session_id: str) -> Connection | None:
        return self._by_id.get(session_id)


@dataclass(frozen=True, slots=True)
class OpenSession:
    session_id: str
    transport: StreamableHTTPServerTransport
    connection: Connection


class Sessions:
    """The SDK's session manager's view of a request's session, read without changing it."""

    def __init__(self, manager: StreamableHTTPSessionManager, connections: SessionConnections) -> None:
        self._manager = manager
        self._connections = connections

    def find(self, scope: Scope, headers: Mapping[str, str]) -> OpenSession | None:
        """The open, initialized session the request names and its credential owns, or None for
        anything the SDK must answer (its 400s and 404s) or treat otherwise."""
        manager = self._manager
        if manager.stateless or getattr(manager, "_task_group", None) is None:
            return None
        session_id = headers.get(MCP_SESSION_ID_HEADER)
        instances: Mapping[str, StreamableHTTPServerTransport] = getattr(manager, "_server_instances", {})
        transport = instances.get(session_id) if session_id is not None else None
        if session_id is None or transport is None or transport.is_terminated:
            return None
        user = scope.get("user")
        requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        if requestor != getattr(manager, "_session_owners", {}).get(session_id):
            return None  # the SDK answers as if the session did not exist
        idle = transport.idle_scope
        if idle is not None and idle.cancel_called:
            return None
        connection = self._connections.get(session_id)
        if connection is None or not connection.initialized.is_set():
            return None
        if connection.protocol_version not in SESSION_VERSIONS:
            return None
        return OpenSession(session_id, transport, connection)

    @staticmethod
    @contextlib.contextmanager
    def in_flight(session: OpenSession) -> Iterator[None]:
        """Holds the session open while a request is served, as the SDK's transport does: its idle
        countdown is suspended, and restarts when the last request in flight completes."""
        transport = session.transport
        idle, timeout = transport.idle_scope, getattr(transport, "_idle_timeout", None)
        if idle is None or timeout is None:
            yield
            return
        transport._requests_in_flight += 1
        idle.deadline = math.inf
        try:
            yield
        finally:
            transport._requests_in_flight -= 1
            if not transport._requests_in_flight:
                idle.deadline = anyio.current_time() + timeout


class Flights:
    """The lean path's requests in flight, so that the client's `notifications/cancelled` stops one as
    the SDK's dispatcher would (the handler is interrupted; the request is answered "cancelled")."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, Any], asyncio.Task[Any]] = {}
        self._cancelled: set[asyncio.Task[Any]] = set()

    async def run(self, session_id: str, request_id: Any, work: Awaitable[T]) -> tuple[bool, T | None]:
        """(False, result) once `work` returns; (True, None) when the client cancelled it. A
        cancellation of the caller itself cancels `work` too and goes on."""
        task = asyncio.ensure_future(work)
        key = (session_id, coerce_request_id(request_id))
        self._tasks[key] = task  # a duplicated id overwrites, as in the SDK's dispatcher
        try:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                if task in self._cancelled and not _cancelling():
                    return True, None
                task.cancel()
                raise
            except Exception:
                if task in self._cancelled:
                    return True, None  # as the SDK: a cancelled request's failure is not answered
                raise
            return (True, None) if task in self._cancelled else (False, result)
        finally:
            if self._tasks.get(key) is task:
                del self._tasks[key]
            self._cancelled.discard(task)

    def cancel(self, session_id: str, params: Any) -> None:
        """Apply a `notifications/cancelled` of `session_id` to the request it names, if that one is here."""
        request_id = cancelled_request_id_from_params(params if isinstance(params, Mapping) else None)
        task = self._tasks.get((session_id, coerce_request_id(request_id))) if request_id is not None else None
        if task is not None and not task.done():
            self._cancelled.add(task)
            task.cancel()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
