"""The relaying part of the MCP edge: a `tools/call` that can relay runs its pipeline in a task of its
own, so the agent can be asked things while it runs (both eras) and can cancel it.

- 2025-era: the tool's requests go to the agent as server-to-client requests (`SessionChannel`);
  the handler waits for the pipeline. If the agent cancels (`notifications/cancelled`), the upstream
  call is stopped and the call is still recorded, as cancelled.
- 2026-07-28: when the call waits for the agent, the handler answers `input_required` with the
  requests and a `requestState` naming the round (`server.relay.rounds`); the agent's retry resumes
  the same pipeline run with its `inputResponses`. Closing a round's response stream cancels the call.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request

from server.auth.middleware import identity_of
from server.call import Call
from server.identity import Identity
from server.metering.tokens import TokenCounter
from server.policy.engine import PolicyEngine
from server.relay.channel import InputRequiredChannel, SessionChannel
from server.relay.needed import LOG_LEVEL_META_KEY, progress_token, relay_needed
from server.relay.relay import Governor, Relay
from server.relay.rounds import Round, Rounds
from server.settings import Settings

RunPipeline = Callable[[Call], Coroutine[Any, Any, Call]]
RoundParams = types.CallToolRequestParams | types.GetPromptRequestParams | types.ReadResourceRequestParams
"""The requests whose results may be `input_required` (2026-07-28): each can relay."""
_SETTLE_POLLS = 200
"""How many short waits (at most ~1 s) for the tool's concurrent requests to finish their decisions."""


class RecordedError(MCPError):
    """A protocol error for a call the pipeline has recorded already (the edge does not record it again)."""


def principal_of(identity: Identity | None) -> str:
    if identity is None:
        return ""
    return json.dumps([identity.issuer, identity.subject, identity.agent_id])


def _bind_principal(ctx: ServerRequestContext[Any, Any]) -> str | None:
    request = ctx.request if isinstance(ctx.request, Request) else None
    identity = identity_of(request.scope) if request is not None else None
    return principal_of(identity) if identity is not None else None


def state_boundary(keys: list[bytes], ttl_seconds: float) -> RequestStateBoundary:
    """The SDK middleware that seals every `requestState` the gateway mints and verifies every echo
    (AES-256-GCM, bound to method, tool, arguments digest, audience and the caller's identity)."""
    security = RequestStateSecurity(keys=keys, ttl=ttl_seconds, bind_principal=_bind_principal)
    return RequestStateBoundary(security, default_audience="castellan")


def _invalid_state() -> MCPError:
    return MCPError(
        code=types.INVALID_PARAMS, message="Invalid or expired requestState", data={"reason": "invalid_request_state"}
    )


def relaying_calls(settings: Settings, engine: PolicyEngine, counter: TokenCounter) -> RelayingCalls:
    keys = [k.get_secret_value().encode() for k in settings.relay.state_keys] or [os.urandom(32)]
    return RelayingCalls(
        Governor(engine, counter, settings.relay.request_timeout_seconds),
        Rounds(settings.relay.round_ttl_seconds, settings.relay.max_waiting_calls),
        state_boundary(keys, settings.relay.round_ttl_seconds),
    )


class RelayingCalls:
    """Runs the calls that can relay. `RunPipeline` is the call pipeline's `run`; `boundary` is the
    SDK middleware the MCP server installs to seal and verify `requestState`."""

    def __init__(self, governor: Governor, rounds: Rounds, boundary: RequestStateBoundary) -> None:
        self._governor = governor
        self._rounds = rounds
        self._timeout = governor.timeout_seconds
        self.boundary = boundary

    def wants(self, ctx: ServerRequestContext[Any, Any], params: RoundParams, meta: Mapping[str, Any]) -> bool:
        if params.request_state is not None or params.input_responses is not None:
            return True
        try:
            capabilities = ctx.session.client_capabilities
        except Exception:
            capabilities = None
        declared = capabilities.model_dump(exclude_none=True) if capabilities is not None else None
        return relay_needed(declared, meta)

    def _relay(
        self, ctx: ServerRequestContext[Any, Any], meta: Mapping[str, Any], relays: bool
    ) -> tuple[Relay, InputRequiredChannel | None]:
        token = progress_token(meta)
        level = meta.get(LOG_LEVEL_META_KEY)
        modern = getattr(ctx, "protocol_version", None) in MODERN_PROTOCOL_VERSIONS
        if not modern and level is None:
            level = "debug"  # 2025-era: every level is sent unless the session set one (logging/setLevel)
        channel = InputRequiredChannel(ctx) if modern and relays else None
        relay = Relay(
            channel if channel is not None else SessionChannel(ctx, self._timeout),
            self._governor,
            progress_token=token,
            log_level=level if isinstance(level, str) else None,
            relays=relays,
        )
        return relay, channel

    async def start(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: RoundParams,
        call: Call,
        meta: Mapping[str, Any],
        run: RunPipeline,
    ) -> Call | types.InputRequiredResult:
        """Run `call`; every call on the SDK path comes here, so that the agent can cancel it. It gets a
        channel to the agent when something can be relayed to it (`wants`)."""
        relay, channel = self._relay(ctx, meta, self.wants(ctx, params, meta))
        if channel is not None and params.input_responses:
            channel.offered = dict(params.input_responses)
        if getattr(ctx, "protocol_version", None) is None:
            # the edge's lean path (2026-07-28 JSON, nothing relayable, no stream to cancel): run inline
            relay.stoppable = False
            return _checked(await run(call.evolve(relay=relay)), None)
        task = asyncio.get_running_loop().create_task(run(call.evolve(relay=relay)), name=f"call-{call.call_id}")
        if channel is None:
            return _checked(await self._finish(task, relay), ctx)
        entry = Round(principal=principal_of(call.identity), task=task, relay=relay, channel=channel)
        return await self._advance(entry)

    async def resume(
        self, ctx: ServerRequestContext[Any, Any], params: RoundParams
    ) -> Call | types.InputRequiredResult:
        """The agent's next round of a waiting call. Raises `MCPError` (invalid params) for a state
        that names no waiting call of this caller."""
        request = ctx.request if isinstance(ctx.request, Request) else None
        identity = identity_of(request.scope) if request is not None else None
        try:
            state = json.loads(params.request_state or "")
            round_id = state["round"] if isinstance(state, dict) else None
        except (ValueError, KeyError, RecursionError):
            round_id = None
        entry = self._rounds.take(round_id, principal_of(identity)) if isinstance(round_id, str) else None
        if entry is None:
            raise _invalid_state()
        entry.channel.rebind(ctx)
        # progress from now on rides this round's response, under the token this round's request carries
        meta = params.meta if isinstance(params.meta, Mapping) else None
        entry.relay.progress_token = progress_token(meta)
        entry.channel.answer(params.input_responses or {})
        return await self._advance(entry)

    async def _finish(self, task: asyncio.Task[Call], relay: Relay) -> Call:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await self._stop(task, relay)
            raise

    @staticmethod
    async def _stop(task: asyncio.Task[Call], relay: Relay) -> None:
        # The agent cancelled (or went away): stop the tool; the pipeline still records the call.
        relay.cancel()
        if isinstance(relay.channel, InputRequiredChannel):
            relay.channel.abandon()
        await asyncio.wait({task})

    async def _advance(self, entry: Round) -> Call | types.InputRequiredResult:
        channel = entry.channel
        while True:
            if not channel.input_requests():
                channel.changed.clear()
                waiter = asyncio.ensure_future(channel.changed.wait())
                try:
                    await asyncio.wait({entry.task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    waiter.cancel()
                    # stopped at once: a plain asyncio cancel (a task's) is delivered only once
                    await self._stop(entry.task, entry.relay)
                    raise
                waiter.cancel()
            if entry.task.done():
                return _checked(entry.task.result(), None)
            # The tool may ask several things at once: let its other requests be decided first.
            for _ in range(_SETTLE_POLLS):
                await asyncio.sleep(0 if _ < 5 else 0.005)
                if entry.relay.deciding == 0 and _ >= 5:
                    break
            if entry.task.done():
                return _checked(entry.task.result(), None)
            requests = channel.input_requests()
            if not requests:
                continue
            round_id = self._rounds.park(entry)
            return types.InputRequiredResult.model_validate(
                {"inputRequests": requests, "requestState": json.dumps({"round": round_id})}
            )


def _checked(call: Call, ctx: ServerRequestContext[Any, Any] | None) -> Call:
    """The finished call, or (2026-07-28) the protocol error an upstream answered that belongs to the
    agent: a capability it must declare (-32021, HTTP 400). The call is recorded either way."""
    relay = call.relay
    modern = ctx is None or getattr(ctx, "protocol_version", None) in MODERN_PROTOCOL_VERSIONS
    if relay is not None and relay.protocol_error is not None and modern:
        error = relay.protocol_error
        raise RecordedError(code=error.code, message=error.message, data=error.data)
    return call
