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
from mcp.shared.exceptions import MCPError
from mcp_types import HEADER_MISMATCH

from server.errors import BackendUnavailable
from server.settings import UpstreamSettings
from server.tool_schema import MAX_STEPS, SchemaRefused, StepsExhausted, compiled, first_error_bounded
from server.upstream.credentials import GatewayCredential, UpstreamCredential, gateway_headers
from server.upstream.http_client import HttpUpstreamClient

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
        self.input_schemas: dict[str, Any] = {}
        """Upstream tool name → input schema as last listed (the lean client mirrors its Mcp-Param headers)."""
        self._lean: HttpUpstreamClient | None = None
        """The pooled client for calls with nothing to relay (HTTP upstreams, once connected)."""

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
                if self.settings.url:
                    self._lean = HttpUpstreamClient(
                        self.settings.url,
                        gateway_headers(self.settings),
                        client.protocol_version,
                        self.settings.timeout_seconds,
                    )
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
            lean, self._lean = self._lean, None
            if lean is not None:
                await lean.close()

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
                self.input_schemas.update({t.name: getattr(t, "input_schema", None) for t in page.tools})
                cursor = getattr(page, "nextCursor", None) or getattr(page, "next_cursor", None)
                if not cursor:
                    return tools
        except Exception:
            await self.close()  # reconnect at the next refresh
            raise

    def serves(self, capability: str) -> bool:
        """The upstream declared `capability` (`resources`, `prompts`, `completions`) when it connected."""
        capabilities = getattr(self._client, "server_capabilities", None) if self._client is not None else None
        return getattr(capabilities, capability, None) is not None

    async def list_resources(self) -> list[Any]:
        return await self._paged(lambda c: self._client.list_resources(cursor=c, cache_mode="bypass"), "resources")

    async def list_resource_templates(self) -> list[Any]:
        return await self._paged(
            lambda c: self._client.list_resource_templates(cursor=c, cache_mode="bypass"), "resource_templates"
        )

    async def read_resource(self, uri: str) -> Any:
        return await self._request(lambda: self._client.read_resource(uri, cache_mode="bypass"))

    async def list_prompts(self) -> list[Any]:
        return await self._paged(lambda c: self._client.list_prompts(cursor=c, cache_mode="bypass"), "prompts")

    async def get_prompt(self, name: str, arguments: dict[str, str]) -> Any:
        return await self._request(lambda: self._client.get_prompt(name, arguments))

    async def complete(self, ref: Any, argument: dict[str, str], context: dict[str, str] | None) -> Any:
        return await self._request(lambda: self._client.complete(ref, argument, context_arguments=context))

    async def _paged(self, fetch: Any, member: str) -> list[Any]:
        """Every page of a list request; a failure drops the connection (reconnected on next use)."""
        await self.connect()
        found: list[Any] = []
        cursor = None
        try:
            while True:
                page = await asyncio.wait_for(fetch(cursor), timeout=self.settings.timeout_seconds)
                found += getattr(page, member)
                cursor = getattr(page, "next_cursor", None)
                if not cursor:
                    return found
        except Exception:
            await self.close()
            raise

    async def _request(self, send: Any) -> Any:
        """One request to the upstream, bounded by its timeout. A protocol error the upstream answered
        with (`MCPError`: an unknown URI, bad arguments) keeps the connection; any other failure drops it."""
        from mcp.shared.exceptions import MCPError

        await self.connect()
        try:
            return await asyncio.wait_for(send(), timeout=self.settings.timeout_seconds)
        except MCPError:
            raise
        except Exception:
            await self.close()
            raise

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
        relay: Any = None,
        meta: dict[str, Any] | None = None,
    ) -> Any:
        """Calls `name` upstream. With nothing to relay (`relay` None) an HTTP upstream's call goes
        through the pooled lean client (`headers` sent on its POST); otherwise through the SDK session."""
        await self.connect()
        bound = _CALL_HEADERS.set(headers)  # the SDK session's POSTs carry them too (`_send_call_headers`)
        try:
            if relay is None and self._lean is not None:
                try:
                    result = await self._lean.call_tool(
                        name, arguments, input_schema=self.input_schemas.get(name), headers=headers, meta=meta
                    )
                except MCPError as exc:
                    if exc.error.code != HEADER_MISMATCH:
                        raise
                    # refused before it ran: our listing is stale; the SDK client re-lists and resends once
                else:
                    if not result.is_error:  # as the SDK: results that are errors are not schema-checked
                        await self._validate_result(name, result)
                    return result
            return await self._client.call_tool(
                name, arguments, read_timeout_seconds=self.settings.timeout_seconds, meta=meta
            )
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
