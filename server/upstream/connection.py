"""One upstream MCP server, connected with the official `mcp` client (streamable HTTP or stdio).

The connection lives in its own task (the client's context must be entered and left in one task);
calls from request tasks go through it. A failed connection is retried on the next refresh.

A call with a relay (something the upstream raises can reach the agent: see `server.relay`) goes
through an SDK client session whose sampling, elicitation, roots, logging and progress callbacks
forward to that call's relay. Over HTTP each such call gets a session of its own, declaring the
agent's capabilities (so the upstream asks only for what the agent can give, and its requests
cannot be confused with another call's); a stdio upstream has one session, so its relayed calls
take turns on it. Calls with nothing to relay go through the lean client, which declares no client
capability (a tool that needs one refuses with -32021).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import Any, cast

import structlog
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import HEADER_MISMATCH
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.errors import BackendUnavailable
from server.relay.channel import ELICIT, ROOTS, SAMPLE
from server.relay.relay import Relay, RelayRefused
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
        self._http: Any = None
        """The shared session's HTTP pool (relayed calls' own sessions use it too)."""
        self._relay: Relay | None = None
        """The relay of the call on the shared session (stdio upstreams: one relayed call at a time)."""
        self._relay_turn = asyncio.Lock()
        self.on_resource_updated: Callable[[str], Coroutine[Any, Any, None]] | None = None
        """Told each `notifications/resources/updated` the upstream sends (`watch_resources`)."""
        self._watching: frozenset[str] = frozenset()
        self._watching_client: Any = None
        self._listening: asyncio.Task[None] | None = None
        self._delivering: set[asyncio.Task[None]] = set()

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
                # The shared session declares every relayable capability, so an upstream lists the tools
                # that need them (server-everything hides its sampling tools otherwise); a request that
                # arrives on it outside a relayed call is refused by `_shared_callbacks`.
                client = await stack.enter_async_context(
                    Client(transport, mode="auto", message_handler=self._on_message, **self._shared_callbacks())
                )
                # The SDK would check results against the upstream's output schema with Python's
                # backtracking re; ours runs the checked schema on RE2 at a bounded cost.
                client.session.validate_tool_result = self._validate_result  # type: ignore[method-assign]
                _send_call_headers(client.session)
                self._client, self._http, self.error = client, http, None
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
            self._client = self._http = None
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

    def sends_resource_updates(self) -> bool:
        """The upstream declared `resources.subscribe` (2025: `resources/subscribe`; 2026-07-28: listen streams)."""
        capabilities = getattr(self._client, "server_capabilities", None) if self._client is not None else None
        return getattr(getattr(capabilities, "resources", None), "subscribe", None) is True

    async def watch_resources(self, uris: frozenset[str]) -> None:
        """From now on the upstream sends updates of `uris` (and no others): on a 2025 upstream by
        `resources/subscribe` / `resources/unsubscribe` on the shared session, on a 2026-07-28 one by a
        `subscriptions/listen` stream for the set, opened again whenever it changes."""
        await self.connect()
        client = self._client
        before = self._watching if self._watching_client is client else frozenset()
        if getattr(client, "protocol_version", None) in MODERN_PROTOCOL_VERSIONS:
            if uris != before or self._listening is None or self._listening.done():
                await self._listen(client, uris)
        else:
            with warnings.catch_warnings():  # deprecated at 2026-07-28; this upstream speaks 2025
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                for uri in sorted(uris - before):
                    await self._request(lambda u=uri: client.subscribe_resource(u))
                for uri in sorted(before - uris):
                    await self._request(lambda u=uri: client.unsubscribe_resource(u))
        self._watching, self._watching_client = uris, client

    async def keep_watching(self) -> None:
        """After a reconnection the upstream forgot what it sent updates of: subscribe again."""
        if self._watching and self._client is not None and self._watching_client is not self._client:
            await self.watch_resources(self._watching)

    async def _listen(self, client: Any, uris: frozenset[str]) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(BaseException):
                await self._listening
            self._listening = None
        if not uris:
            return
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hold() -> None:
            try:
                async with client.listen(resource_subscriptions=sorted(uris)) as subscription:
                    acked.set_result(None)
                    async for event in subscription:
                        uri = getattr(event, "uri", None)
                        if isinstance(uri, str) and self.on_resource_updated is not None:
                            await self.on_resource_updated(uri)
            except Exception as exc:
                if not acked.done():
                    acked.set_exception(exc)
                else:
                    log.warning("upstream_listen_ended", upstream=self.name, error=str(exc)[:300])

        self._listening = asyncio.get_running_loop().create_task(hold(), name=f"upstream-{self.name}-listen")
        await asyncio.wait_for(asyncio.shield(acked), timeout=self.settings.timeout_seconds)

    async def _on_message(self, message: Any) -> None:
        """The shared session's notifications: a 2025 upstream's resource updates are passed on (a
        2026-07-28 upstream's arrive on the listen stream, `_listen`)."""
        import mcp_types as types

        if not isinstance(message, types.ResourceUpdatedNotification) or self.on_resource_updated is None:
            return
        if getattr(self._client, "protocol_version", None) in MODERN_PROTOCOL_VERSIONS:
            return
        # not awaited here: the session's receive loop must not wait for the agents' streams
        task = asyncio.get_running_loop().create_task(self.on_resource_updated(str(message.params.uri)))
        self._delivering.add(task)
        task.add_done_callback(self._delivering.discard)

    async def list_resources(self) -> list[Any]:
        return await self._paged(lambda c: self._client.list_resources(cursor=c, cache_mode="bypass"), "resources")

    async def list_resource_templates(self) -> list[Any]:
        return await self._paged(
            lambda c: self._client.list_resource_templates(cursor=c, cache_mode="bypass"), "resource_templates"
        )

    async def read_resource(self, uri: str, relay: Relay | None = None) -> Any:
        return await self._relayed(relay, lambda client: client.read_resource(uri, cache_mode="bypass"))

    async def list_prompts(self) -> list[Any]:
        return await self._paged(lambda c: self._client.list_prompts(cursor=c, cache_mode="bypass"), "prompts")

    async def get_prompt(self, name: str, arguments: dict[str, str], relay: Relay | None = None) -> Any:
        return await self._relayed(relay, lambda client: client.get_prompt(name, arguments))

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
        relay: Relay | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Any:
        """Calls `name` upstream. With nothing to relay (`relay` None) an HTTP upstream's call goes
        through the pooled lean client (`headers` sent on its POST); with a relay, through an SDK
        session whose callbacks forward what the upstream raises to it (`server.relay`)."""
        if relay is not None and self.settings.url:
            return await self._call_own_session(name, arguments, relay, headers, meta)
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
            if relay is None:
                return await self._client.call_tool(
                    name, arguments, read_timeout_seconds=self.settings.timeout_seconds, meta=meta
                )
            async with self._relay_turn:
                self._relay = relay
                try:
                    return await self._client.call_tool(
                        name, arguments, read_timeout_seconds=self.settings.timeout_seconds,
                        progress_callback=_progress_to(relay), meta=cast(Any, meta),
                    )  # fmt: skip
                finally:
                    self._relay = None
        except (ResultRefused, MCPError):  # the upstream answered: the connection is fine
            raise
        except Exception:
            await self.close()  # reconnect on the next call or refresh
            raise
        finally:
            _CALL_HEADERS.reset(bound)

    async def _call_own_session(
        self,
        name: str,
        arguments: dict[str, Any],
        relay: Relay,
        headers: dict[str, str] | None,
        meta: dict[str, Any] | None,
    ) -> Any:
        """A relayed call over HTTP, on a session of its own that declares what the agent supports."""

        assert self.settings.url
        try:
            return await self._own_session(name, arguments, relay, headers, meta)
        except BaseExceptionGroup as group:  # the session's task group wraps what the call raised
            raise _first_leaf(group) from None

    async def _own_session(
        self,
        name: str,
        arguments: dict[str, Any],
        relay: Relay,
        headers: dict[str, str] | None,
        meta: dict[str, Any] | None,
    ) -> Any:
        async with self._relay_session(relay, headers) as client:
            client.session.validate_tool_result = self._validate_result
            return await self._rounds(client, name, arguments, relay, meta)

    @contextlib.asynccontextmanager
    async def _relay_session(self, relay: Relay, headers: dict[str, str] | None) -> AsyncIterator[Any]:
        """An SDK client session of the relayed request's own (HTTP upstreams), declaring what the agent
        supports, whose callbacks forward what the upstream asks to `relay`."""
        from mcp.client.client import Client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        assert self.settings.url
        # A 2026-07-28 upstream needs no handshake: the session adopts what the shared one discovered.
        known = getattr(getattr(self._client, "session", None), "discover_result", None) if not headers else None
        mode: Any = getattr(self._client, "protocol_version", None) if known is not None else "auto"
        if mode not in MODERN_PROTOCOL_VERSIONS:
            mode, known = "auto", None
        async with contextlib.AsyncExitStack() as stack:
            if self._http is not None and not headers:
                http = self._http  # the shared pool (its headers are the gateway's own)
            else:
                http = await stack.enter_async_context(
                    create_mcp_http_client(headers={**gateway_headers(self.settings), **(headers or {})})
                )
            client = await stack.enter_async_context(
                Client(
                    streamable_http_client(self.settings.url, http_client=http),
                    mode=mode,
                    prior_discover=known,
                    log_level=relay.log_level,  # type: ignore[arg-type]
                    **_callbacks(lambda: relay, relay.supports),
                )
            )
            yield client

    async def _relayed(self, relay: Relay | None, send: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        """A request other than `tools/call` (`prompts/get`, `resources/read`) that may raise requests
        for the agent: with a relay that can carry them, on a session whose callbacks forward them to
        it (the SDK client drives a 2026-07-28 upstream's input-required rounds through the same
        callbacks); else on the shared session, which refuses them."""
        if relay is None or not relay.relays:
            return await self._request(lambda: send(self._client))
        await self.connect()
        if not self.settings.url:
            async with self._relay_turn:  # stdio: one session, relayed requests take turns on it
                self._relay = relay
                try:
                    return await self._request(lambda: send(self._client))
                finally:
                    self._relay = None
        try:
            async with self._relay_session(relay, None) as client:
                return await asyncio.wait_for(send(client), timeout=self.settings.timeout_seconds)
        except BaseExceptionGroup as group:  # the session's task group wraps what the request raised
            raise _first_leaf(group) from None

    async def _rounds(
        self, client: Any, name: str, arguments: dict[str, Any], relay: Relay, meta: dict[str, Any] | None
    ) -> Any:
        """The call, its input-required rounds (2026-07-28 upstreams) driven here rather than by the SDK,
        so each request keeps the upstream's key on its way to the agent. A request the gateway refuses
        ends the call (`RelayRefused`)."""
        import mcp_types as types

        responses: dict[str, Any] | None = None
        state: str | None = None
        for _ in range(MAX_INPUT_ROUNDS):
            result = await client.session.call_tool(
                name, arguments, read_timeout_seconds=self.settings.timeout_seconds,
                progress_callback=_progress_to(relay), meta=cast(Any, meta),
                input_responses=responses, request_state=state, allow_input_required=True,
            )  # fmt: skip
            if not isinstance(result, types.InputRequiredResult):
                return result
            state = result.request_state
            requests = result.input_requests or {}
            if not requests:
                responses = None
                await asyncio.sleep(0.05)
                continue
            answers = await asyncio.gather(*(_ask(relay, key, request) for key, request in requests.items()))
            responses = dict(zip(requests, answers, strict=True))
        raise RuntimeError(f"upstream {self.name} asked for input more than {MAX_INPUT_ROUNDS} rounds")

    def _shared_callbacks(self) -> dict[str, Any]:
        return _callbacks(lambda: self._relay, lambda method: True)

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
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None
        self._client = None


def _result_model(method: str, params: dict[str, Any]) -> Any:
    import mcp_types as types

    if method == SAMPLE:
        return types.CreateMessageResultWithTools if params.get("tools") else types.CreateMessageResult
    return types.ElicitResult if method == ELICIT else types.ListRootsResult


MAX_INPUT_ROUNDS = 10


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The exception that matters in a task group's group: a refusal if there is one, else the first."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, RelayRefused)), leaves[0] if leaves else group)


async def _ask(relay: Relay, key: str, request: Any) -> Any:
    wire = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    params = dict(wire.get("params") or {})
    params.pop("_meta", None)
    result = await relay.request(wire["method"], params, key)
    return _result_model(wire["method"], params).model_validate(result)


def _callbacks(relay_of: Any, declares: Any) -> dict[str, Any]:
    """SDK client callbacks that forward each request the upstream makes to the relay `relay_of()`
    returns; only the capabilities `declares(method)` allows are declared to the upstream."""
    import mcp_types as types

    async def forward(method: str, params: Any) -> Any:
        relay = relay_of()
        wire = params.model_dump(by_alias=True, mode="json", exclude_none=True) if params is not None else {}
        wire.pop("_meta", None)
        if relay is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message="this call cannot relay requests to the agent")
        try:
            result = await relay.request(method, wire)
        except RelayRefused as exc:
            return types.ErrorData(code=exc.code, message=exc.message, data=exc.body)
        return _result_model(method, wire).model_validate(result)

    async def sampling(context: Any, params: Any) -> Any:
        return await forward(SAMPLE, params)

    async def elicitation(context: Any, params: Any) -> Any:
        return await forward(ELICIT, params)

    async def roots(context: Any) -> Any:
        return await forward(ROOTS, None)

    async def logging(params: Any) -> None:
        relay = relay_of()
        if relay is not None:
            wire = params.model_dump(by_alias=True, mode="json", exclude_none=True)
            await relay.notify("notifications/message", wire)

    callbacks: dict[str, Any] = {"logging_callback": logging}
    if declares(SAMPLE):
        callbacks["sampling_callback"] = sampling
    if declares(ELICIT):
        callbacks["elicitation_callback"] = elicitation
    if declares(ROOTS):
        callbacks["list_roots_callback"] = roots
    return callbacks


def _progress_to(relay: Relay) -> Any:
    async def progress(progress: float, total: float | None, message: str | None) -> None:
        params: dict[str, Any] = {"progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await relay.notify("notifications/progress", params)

    return progress
