"""One upstream MCP server, connected with the official `mcp` client (streamable HTTP or stdio).

The connection lives in its own task (the client's context must be entered and left in one task);
calls from request tasks go through it. A failed connection is retried on the next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import structlog

from server.errors import BackendUnavailable
from server.settings import UpstreamSettings
from server.tool_schema import MAX_STEPS, SchemaRefused, StepsExhausted, compiled, first_error_bounded
from server.upstream.credentials import GatewayCredential, UpstreamCredential, gateway_headers

log = structlog.get_logger("castellan.upstream")


_CALL_HEADERS: ContextVar[Mapping[str, str] | None] = ContextVar("castellan_upstream_call_headers", default=None)


def _send_call_headers(session: Any) -> None:
    """The SDK session sends a request's `opts["headers"]` on its HTTP POST; requests made while
    `_CALL_HEADERS` is set (in the calling task) get those headers added."""
    dispatcher = session._dispatcher
    send = dispatcher.send_raw_request

    async def send_raw_request(method: str, params: Any, opts: Any = None) -> Any:
        extra = _CALL_HEADERS.get()
        if extra:
            opts = dict(opts or {})
            opts["headers"] = {**(opts.get("headers") or {}), **extra}
        return await send(method, params, opts)

    dispatcher.send_raw_request = send_raw_request


class ResultRefused(RuntimeError):
    """A result that breaks its tool's output schema: a tool failure, not a broken connection."""


class UpstreamConnection:
    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.error: str | None = None
        self.credential: UpstreamCredential = GatewayCredential()
        """What each call carries (set by the gateway from `settings.credential`)."""
        self.output_schemas: dict[str, Any] = {}
        """Upstream tool name → output schema, checked by the manager (`server.tool_schema`)."""

    def _transport(self) -> tuple[Any, Any]:
        """The client transport, and an HTTP client to close afterwards (or None)."""
        if self.settings.url:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            http = create_mcp_http_client(headers=gateway_headers(self.settings))
            return streamable_http_client(self.settings.url, http_client=http), http
        from mcp.client.stdio import StdioServerParameters, stdio_client

        argv, env = list(self.settings.command), {**os.environ, **self.settings.env}
        if self.settings.sandbox is not None:  # least privilege: see docs/tools.md, "Sandboxed stdio upstreams"
            from server.sandbox.stdio import sandboxed_command

            argv, env = sandboxed_command(self.name, self.settings.sandbox, argv, self.settings.env)
        command, *args = argv
        params = StdioServerParameters(command=command, args=args, env=env)
        return stdio_client(params), None

    async def connect(self) -> None:
        """Connects (in the connection's own task); raises BackendUnavailable when it cannot."""
        if self._task is not None and not self._task.done() and self._client is not None:
            return
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._hold(ready), name=f"upstream-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout=self.settings.timeout_seconds)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            await self.close()
            raise BackendUnavailable("invoke", f"upstream {self.name} unavailable: {self.error}") from None

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        from mcp.client.client import Client

        transport, http = self._transport()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if http is not None:
                    await stack.enter_async_context(http)
                client = await stack.enter_async_context(Client(transport, mode="auto"))
                # The SDK would check results against the upstream's output schema with Python's
                # backtracking re; ours runs the checked schema on RE2 at a bounded cost.
                client.session.validate_tool_result = self._validate_result  # type: ignore[method-assign]
                _send_call_headers(client.session)
                self._client, self.error = client, None
                ready.set_result(None)
                log.info("upstream_connected", upstream=self.name, protocol=getattr(client, "protocol_version", None))
                await self._stop.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                self.error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.warning("upstream_disconnected", upstream=self.name, error=self.error)
        finally:
            self._client = None

    async def list_tools(self) -> list[Any]:
        await self.connect()
        tools: list[Any] = []
        cursor = None
        try:
            while True:
                page = await asyncio.wait_for(
                    self._client.list_tools(cursor=cursor, cache_mode="bypass"), timeout=self.settings.timeout_seconds
                )
                tools += page.tools
                cursor = getattr(page, "nextCursor", None) or getattr(page, "next_cursor", None)
                if not cursor:
                    return tools
        except Exception:
            await self.close()  # reconnect at the next refresh
            raise

    async def call_tool(self, name: str, arguments: dict[str, Any], *, headers: Mapping[str, str] | None = None) -> Any:
        """`headers`: this call's own HTTP headers (a per-user credential, server/upstream/credentials.py),
        sent on its POST over the connection's; never the agent's token."""
        await self.connect()
        bound = _CALL_HEADERS.set(headers)
        try:
            return await self._client.call_tool(name, arguments, read_timeout_seconds=self.settings.timeout_seconds)
        except ResultRefused:
            raise
        except Exception:
            await self.close()  # reconnect on the next call or refresh
            raise
        finally:
            _CALL_HEADERS.reset(bound)

    async def _validate_result(self, name: str, result: Any) -> None:
        """Raises `ResultRefused` (a tool failure) when a result breaks its tool's output schema."""
        schema = self.output_schemas.get(name)
        if schema is None:
            return  # no output schema, or a refused one (the tool is blocked)
        structured = getattr(result, "structured_content", None)
        if structured is None:
            raise ResultRefused(f"tool {name} has an output schema but did not return structured content")
        try:
            problem = await first_error_bounded(compiled(schema), structured, MAX_STEPS)
        except (SchemaRefused, StepsExhausted) as exc:
            problem = f"its output schema cannot check it ({type(exc).__name__})"
        if problem:
            raise ResultRefused(f"tool {name} returned structured content that breaks its output schema: {problem}")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None
        self._client = None
