"""The gateway's ASGI application: FastAPI, with `/mcp` dispatched at its top to the edge's own chain.

Every governed call is a request to `/mcp`. Through FastAPI it would pass eight layers before its
endpoint (the server-error, exception-telemetry, app body-limit, request-id, exception and exit-stack
middlewares, the router, the route), each a coroutine frame and three of them a send wrapper, for
nothing `/mcp` uses: its endpoint is a plain ASGI app that answers every error itself. `GatewayApp`
hands such a request straight to that endpoint, with what of those layers `/mcp` can observe done
inline — the request id (kept in the scope, bound to the logs, echoed back in `x-request-id`) and the
exception handling (a registered handler's response while nothing was sent, then the exception goes on
to the server, as Starlette's `ServerErrorMiddleware` does) — behind one send wrapper.

Anything else — other paths, `/mcp/`, other methods, a root path, and every request while FastAPI's
native OpenTelemetry is on (a tracer, meter or logger provider configured when the app started, or
FastAPI's own auto-configuration at startup) — goes through the full FastAPI stack unchanged
(`full_stack`), where `/mcp` stays routed to the same endpoint. (FastAPI asks the OpenTelemetry API
on every request, at ~5-15 µs; here the answer is taken once startup completes: a provider set later,
while serving, does not get `/mcp` spans.)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, reset_contextvars

from server.in_flight import WORKING
from server.request_id import assign_request_id, stamp_request_id

MCP_PATH = "/mcp"
MCP_METHODS = frozenset({"GET", "POST", "DELETE"})
"""The methods the `/mcp` route accepts (HEAD, which Starlette adds for GET, and any other method are the
router's to answer)."""


class GatewayApp(FastAPI):
    """A FastAPI app whose `/mcp` requests skip the FastAPI/Starlette layers (see the module docstring).

    `mcp` is the `/mcp` endpoint (the same one the router holds); None: every request takes the full
    stack."""

    mcp: ASGIApp | None = None
    _telemetry_on: bool | None = None
    """FastAPI's native telemetry as it was when startup completed (None: not started; ask each time)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":  # counted while served (server/in_flight)
            working = WORKING
            working.requests += 1
            try:
                await self._route(scope, receive, send)
            finally:
                working.requests -= 1
            return
        await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.mcp is not None and self._lean(scope):
            await self._serve_mcp(self.mcp, scope, receive, send)
            return
        if scope["type"] == "lifespan":
            send = self._noting_startup(send)
        await self.full_stack(scope, receive, send)

    async def full_stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request through FastAPI's middleware stack and router, `/mcp` included."""
        await super().__call__(scope, receive, send)

    def _lean(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["path"] != MCP_PATH or scope["method"] not in MCP_METHODS:
            return False
        if self.root_path or scope.get("root_path"):
            return False  # the router strips a root path; this dispatch does not
        on = self._telemetry_on
        return not (self._telemetry_enabled() if on is None else on)

    def _telemetry_enabled(self) -> bool:
        telemetry = getattr(self, "_native_telemetry", None)  # FastAPI's own server spans and metrics
        return telemetry is not None and bool(telemetry.enabled())

    def _noting_startup(self, send: Send) -> Send:
        async def noting(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self._telemetry_on = self._telemetry_enabled()
            await send(message)

        return noting

    async def _serve_mcp(self, endpoint: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # as Starlette sets it (`Request.app`)
        request_id = assign_request_id(scope)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                stamp_request_id(message, request_id)
            await send(message)

        tokens = bind_contextvars(request_id=request_id)
        try:
            await endpoint(scope, receive, send_with_id)
        except Exception as exc:
            handled = self._handler_for(exc)
            if handled is not None:  # as Starlette's ExceptionMiddleware (inside the request id)
                if started:
                    raise RuntimeError("Caught handled exception, but response already started.") from exc
                response = await _respond(handled, Request(scope, receive), exc)
                if response is not None:
                    await response(scope, receive, send_with_id)
                exc.__traceback__ = None
                return
            # as ServerErrorMiddleware (outside the request id): the 500 handler runs (it logs), its
            # response goes out if nothing did, and the exception goes on to the server
            handler = self.exception_handlers.get(500) or self.exception_handlers.get(Exception)
            request = Request(scope)
            response = (
                await _respond(handler, request, exc)
                if handler is not None
                else PlainTextResponse("Internal Server Error", status_code=500)
            )
            if not started and response is not None:
                await response(scope, receive, send)
            raise exc
        finally:
            reset_contextvars(**tokens)

    def _handler_for(self, exc: Exception) -> Any:
        """The handler FastAPI's ExceptionMiddleware would call for `exc` (500/Exception are the outer one's)."""
        handlers = self.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code in handlers and exc.status_code != 500:
            return handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in handlers:
                return handlers[cls]
        return None


async def _respond(handler: Any, request: Request, exc: Exception) -> Response | None:
    if is_async_callable(handler):
        result: Response | None = await handler(request, exc)
    else:
        result = await run_in_threadpool(handler, request, exc)
    return result
