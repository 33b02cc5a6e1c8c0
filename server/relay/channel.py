"""The gateway→agent channel: ask the agent's client (its model, its user, its roots) during a call.

One interface for both protocol eras, used by the relay (requests an upstream raises) and by any
pipeline stage that needs the agent's user (in-band approval by elicitation):

- 2025-11-25 and earlier (`SessionChannel`): a server-to-client JSON-RPC request on the call's SSE
  response stream, or, when the gateway answers POSTs with JSON, on the session's GET stream.
- 2026-07-28 (`InputRequiredChannel`): the request is parked; the edge answers the agent's
  `tools/call` with an `input_required` result carrying it, and the agent's retry answers it
  (multi-round-trip requests, SEP-2322).

`supports(method)` says whether the client declared the capability; `request` raises
`RelayUnsupported` when it did not, and `RelayFailed` when the client answered with an error.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.message import ServerMessageMetadata

SAMPLE = "sampling/createMessage"
ELICIT = "elicitation/create"
ROOTS = "roots/list"
REQUEST_METHODS = (SAMPLE, ELICIT, ROOTS)
CAPABILITY_OF = {SAMPLE: "sampling", ELICIT: "elicitation", ROOTS: "roots"}


class RelayUnsupported(Exception):
    """The agent's client cannot take this request (it did not declare the capability, or has no
    channel the gateway could reach it on)."""


class RelayFailed(Exception):
    """The agent's client answered the request with an error (`code`, `message`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AgentChannel(Protocol):
    """What the gateway can ask of the agent's client during one call."""

    era: str
    """"session" (2025: server-to-client requests) or "input_required" (2026-07-28: MRTR results)."""

    def supports(self, method: str) -> bool:
        """The client declared the capability `method` needs (and the channel can carry it)."""
        ...

    async def request(self, method: str, params: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        """The client's result for `method` (wire JSON). Raises `RelayUnsupported`, `RelayFailed`.
        `key`: the asker's name for the request (an upstream's `inputRequests` key), kept when it can be."""
        ...

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        """A notification about this call (log message, progress); dropped when it cannot be sent."""
        ...


async def elicit(channel: AgentChannel, message: str, requested_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Ask the agent's user `message` with a form (`requested_schema`, a flat JSON Schema object).

    Returns the `ElicitResult` as JSON: `{"action": "accept" | "decline" | "cancel", "content": {...}}`.
    Raises `RelayUnsupported` when the client cannot elicit (check `channel.supports(ELICIT)` first).
    """
    params = {"mode": "form", "message": message, "requestedSchema": dict(requested_schema)}
    return await channel.request(ELICIT, params)


def _capabilities(ctx: ServerRequestContext[Any, Any]) -> types.ClientCapabilities | None:
    try:
        return ctx.session.client_capabilities
    except Exception:
        return None


def declared(capabilities: types.ClientCapabilities | None, method: str) -> bool:
    if capabilities is None:
        return False
    if method == ELICIT:
        return capabilities.elicitation is not None
    return getattr(capabilities, CAPABILITY_OF[method], None) is not None


_RESULTS: dict[str, type[Any]] = {
    SAMPLE: types.CreateMessageResult,
    ELICIT: types.ElicitResult,
    ROOTS: types.ListRootsResult,
}
_REQUESTS: dict[str, type[Any]] = {
    SAMPLE: types.CreateMessageRequest,
    ELICIT: types.ElicitRequest,
    ROOTS: types.ListRootsRequest,
}


def _dump(model: Any) -> dict[str, Any]:
    return dict(model.model_dump(by_alias=True, mode="json", exclude_none=True))


def _valid_response(method: str, response: Any) -> dict[str, Any] | None:
    """`response` as a valid result of `method` (wire JSON), or None when it is not one."""
    if hasattr(response, "model_dump"):  # the SDK parsed it against a union: check it against its request
        response = response.model_dump(by_alias=True, mode="json", exclude_none=True)
    if not isinstance(response, dict):
        return None
    models = [_RESULTS[method]] + ([types.CreateMessageResultWithTools] if method == SAMPLE else [])
    for model in models:
        try:
            return _dump(model.model_validate(response))
        except Exception:
            continue
    return None


class SessionChannel:
    """2025-era: server-to-client requests on the call's own SSE stream (related to its request id), or
    on the session's GET stream when the POST is answered with JSON. Notifications go the same way."""

    era = "session"

    def __init__(self, ctx: ServerRequestContext[Any, Any], timeout_seconds: float) -> None:
        self._ctx = ctx
        self._timeout = timeout_seconds
        self.capabilities = _capabilities(ctx)

    def _metadata(self) -> ServerMessageMetadata | None:
        # In JSON-response mode the POST's body carries only the response: use the GET stream.
        if self._ctx.request_id is not None and self._ctx.session.can_send_request:
            return ServerMessageMetadata(related_request_id=self._ctx.request_id)
        return None

    def supports(self, method: str) -> bool:
        return declared(self.capabilities, method)

    async def request(self, method: str, params: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        if not self.supports(method):
            raise RelayUnsupported(f"the client did not declare the {CAPABILITY_OF[method]} capability")
        if method == ROOTS:
            request = types.ListRootsRequest()
        else:
            request = _REQUESTS[method].model_validate({"method": method, "params": dict(params)})
        result_type = _RESULTS[method]
        if method == SAMPLE and params.get("tools"):
            result_type = types.CreateMessageResultWithTools
        try:
            result = await self._ctx.session.send_request(
                request, result_type, request_read_timeout_seconds=self._timeout, metadata=self._metadata()
            )
        except NoBackChannelError:
            raise RelayUnsupported("the connection has no channel for server-to-client requests") from None
        except MCPError as exc:
            raise RelayFailed(exc.error.code, exc.error.message) from None
        return _dump(result)

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        metadata = self._metadata()
        try:
            if method == "notifications/progress":
                await self._ctx.session.send_progress_notification(
                    params["progressToken"],
                    params["progress"],
                    params.get("total"),
                    params.get("message"),
                    related_request_id=str(metadata.related_request_id) if metadata else None,
                )
            elif method == "notifications/message":
                await self._ctx.session.send_log_message(
                    params.get("level", "info"),
                    params.get("data"),
                    params.get("logger"),
                    related_request_id=metadata.related_request_id if metadata else None,
                )
        except Exception:  # a notification the client cannot take is dropped, the call goes on
            return


@dataclass
class Parked:
    """One request waiting for the agent's answer in a later round."""

    method: str
    params: dict[str, Any]
    answer: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class InputRequiredChannel:
    """2026-07-28: requests wait here until the edge hands them to the agent as `inputRequests` of an
    `input_required` result, and the agent's retry of the call answers them (see `server.relay.rounds`).

    Notifications ride the request's response stream when it is SSE (the edge picks SSE for a call
    that can relay); a JSON response drops them.
    """

    era = "input_required"

    def __init__(self, ctx: ServerRequestContext[Any, Any]) -> None:
        self.capabilities = _capabilities(ctx)
        self._ctx = ctx
        self.parked: dict[str, Parked] = {}
        self._keys = itertools.count(1)
        self.changed = asyncio.Event()
        self.offered: dict[str, Any] = {}
        """`inputResponses` the agent sent with its first request, before anything was asked: each answers
        the request with its key if the tool asks it (the request is still decided and audited first)."""

    def rebind(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """The agent's next round: notifications now go on its stream."""
        self._ctx = ctx

    def supports(self, method: str) -> bool:
        return declared(self.capabilities, method)

    async def request(self, method: str, params: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        if not self.supports(method):
            raise RelayUnsupported(f"the client did not declare the {CAPABILITY_OF[method]} capability")
        if key is not None and key in self.offered:  # answered before it was asked (SEP-2322 allows it)
            answer = _valid_response(method, self.offered.pop(key))
            if answer is not None:
                return answer
        if key is None or key in self.parked:
            key = f"{CAPABILITY_OF[method]}-{next(self._keys)}"
        parked = Parked(method, dict(params))
        self.parked[key] = parked
        self.changed.set()
        try:
            return await parked.answer
        finally:
            self.parked.pop(key, None)

    def input_requests(self) -> dict[str, dict[str, Any]]:
        """What the agent must answer now: `{key: {"method": ..., "params": ...}}`."""
        return {
            key: {"method": p.method, "params": p.params} if p.method != ROOTS else {"method": p.method}
            for key, p in self.parked.items()
            if not p.answer.done()
        }

    def answer(self, responses: Mapping[str, Any]) -> None:
        """Deliver the agent's `inputResponses`. Unknown keys are ignored; a response that is not a
        valid result for its request is an error for that request (the upstream sees it)."""
        for key, response in responses.items():
            parked = self.parked.get(key)
            if parked is None or parked.answer.done():
                continue
            result = _valid_response(parked.method, response)
            if result is None:
                parked.answer.set_exception(RelayFailed(types.INVALID_PARAMS, f"invalid response for {parked.method}"))
            else:
                parked.answer.set_result(result)

    def abandon(self) -> None:
        """The agent is not coming back: every waiting request fails (its asker stops waiting)."""
        for parked in self.parked.values():
            if not parked.answer.done():
                parked.answer.set_exception(RelayFailed(types.INTERNAL_ERROR, "the agent did not answer in time"))

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        try:
            if method == "notifications/progress":
                await self._ctx.session.send_progress_notification(
                    params["progressToken"],
                    params["progress"],
                    params.get("total"),
                    params.get("message"),
                    related_request_id=str(self._ctx.request_id) if self._ctx.request_id is not None else None,
                )
            elif method == "notifications/message":
                await self._ctx.session.send_log_message(
                    params.get("level", "info"), params.get("data"), params.get("logger"),
                    related_request_id=self._ctx.request_id,
                )  # fmt: skip
        except Exception:
            return
