"""The governed relay of one call: every request an upstream raises is a policy decision of its own.

An upstream tool may, while it runs, ask the agent's client to sample its model
(`sampling/createMessage`), ask its user (`elicitation/create`) or list its roots (`roots/list`).
Each such request is decided (`input.action` "sample", "elicit" or "roots", with the upstream and
the tool that asked, and the request itself as `input.request`), sampling is metered against the
call's token reservation, and each is recorded as a child span of the call's audit record
(`relayed`). Only then does it reach the agent (`AgentChannel`); the answer goes back to the upstream.

A refused request reaches the upstream as a JSON-RPC error naming the stage and the reasons
(`RelayRefused`); the upstream's tool decides what to do with it. Never raises anything else:
a policy engine that cannot answer is a refusal (fail closed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from server.errors import CastellanError
from server.metering.tokens import TokenCounter
from server.policy.engine import PolicyEngine
from server.relay.channel import (
    CAPABILITY_OF,
    ELICIT,
    ROOTS,
    SAMPLE,
    AgentChannel,
    RelayFailed,
    RelayUnsupported,
)

if TYPE_CHECKING:
    from server.call import Call

log = structlog.get_logger("castellan.relay")
T = TypeVar("T")

ACTION_OF = {SAMPLE: "sample", ELICIT: "elicit", ROOTS: "roots"}
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603


class CallCancelled(Exception):
    """The agent cancelled the call while its tool ran: the tool was stopped."""


class RelayRefused(Exception):
    """The gateway will not pass this request to the agent: `code` and `message` go to the upstream."""

    def __init__(self, code: int, message: str, body: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.body = dict(body)


active_relay: ContextVar[Relay | None] = ContextVar("castellan_relay", default=None)
"""The relay of the call whose tool is running (set by the invoke stage; upstream tools pass it on)."""


@dataclass(frozen=True, slots=True)
class Governor:
    """What every relay shares: the policy engine and the token counter."""

    engine: PolicyEngine
    counter: TokenCounter
    timeout_seconds: float = 300.0


class Relay:
    """One call's relay. The edge makes it with the call's `AgentChannel`; the invoke stage binds it
    to the call (`bind`) before the tool runs; the upstream connection forwards to it."""

    def __init__(
        self,
        channel: AgentChannel,
        governor: Governor,
        *,
        progress_token: str | int | None = None,
        log_level: str | None = None,
        relays: bool = True,
    ) -> None:
        self.channel = channel
        self.relays = relays
        """Something the upstream raises can reach this caller; false: the relay only lets the agent cancel."""
        self.governor = governor
        self.progress_token = progress_token
        self.log_level = log_level
        self.call: Call | None = None
        self.spans: list[dict[str, Any]] = []
        self.sampled_tokens = 0
        self.cancelled = False
        self._running: asyncio.Future[Any] | None = None
        self.protocol_error: Any = None
        """An upstream's protocol error the agent should get as one (`ErrorData`: a missing capability)."""
        self.upstream_error: Any = None
        """Any protocol error the upstream answered the call with (`ErrorData`): a task that ends so failed."""
        self.deciding = 0
        """Requests being decided right now (the edge waits for them before it answers a round)."""
        self.stoppable = True
        """The agent can stop the call through this relay (`cancel`); false on the edge's inline path,
        where nothing can (the tool then runs in the call's own task, without a task of its own)."""

    async def cancellable(self, work: Awaitable[T]) -> T:
        """Run `work` (the upstream call) so that `cancel` stops it. Raises `CallCancelled` then."""
        task = asyncio.ensure_future(work)
        self._running = task
        try:
            await asyncio.wait({task})
        finally:
            self._running = None
            if not task.done():  # our caller was cancelled (a timeout): the upstream call stops too
                task.cancel()
        if task.cancelled():
            raise CallCancelled("the agent cancelled the call")
        return task.result()

    def cancel(self) -> None:
        """The agent cancelled the call: stop the upstream call (its outcome is recorded as cancelled)."""
        self.cancelled = True
        if self._running is not None:
            self._running.cancel()

    def bind(self, call: Call) -> Relay:
        self.call = call
        return self

    def unbind(self) -> None:
        """The tool's run is over: what arrives now is refused as outside any call. It also breaks the
        call <-> relay cycle, so the call's objects are freed when the request is done with them
        instead of waiting for the cyclic collector (~50 objects a call, measured)."""
        self.call = None

    def supports(self, method: str) -> bool:
        return self.channel.supports(method)

    async def request(self, method: str, params: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        """The agent's answer to `method`. Raises `RelayRefused` (policy, budget, no capability,
        the agent's own error)."""
        action = ACTION_OF[method]
        started = time.time()
        span: dict[str, Any] = {"action": action, "method": method, "started_at": started}
        self.deciding += 1
        try:
            call = self.call
            if call is None or call.tool is None:
                raise self._refuse(span, "relay", "a request arrived outside any call", code=INTERNAL_ERROR)
            span |= {"upstream": call.tool.spec.upstream, "tool": call.tool.spec.name}
            if not self.channel.supports(method):
                raise self._refuse(
                    span, "relay", f"the agent's client does not support {CAPABILITY_OF[method]}", outcome="unsupported"
                )
            estimate = 0
            if method == SAMPLE:
                estimate = self._estimate(params)
                room = self._room(call)
                if room is not None and estimate > room:
                    raise self._refuse(
                        span, "metering",
                        f"sampling needs up to {estimate} tokens; {room} are left in this call's reservation",
                    )  # fmt: skip
            from server.policy._input import build_relay_input

            try:
                decision = await self.governor.engine.decide(build_relay_input(call, action, method, params))
            except CastellanError as exc:
                raise self._refuse(span, "policy", *exc.reasons) from None
            span["policy_version"] = decision.policy_version
            if not decision.allow:
                raise self._refuse(span, "policy", *(decision.reasons or ("denied by policy",)))
        except RelayRefused:
            span["ms"] = round((time.time() - started) * 1000, 3)
            raise
        finally:
            self.deciding -= 1
        span["decision"] = "allow"
        try:
            result = await self.channel.request(method, params, key)
        except RelayUnsupported as exc:
            self._close(span, started, "unsupported", str(exc))
            body = {"decision": "deny", "stage": "relay", "reasons": [str(exc)]}
            raise RelayRefused(INVALID_REQUEST, str(exc), body) from None
        except RelayFailed as exc:
            self._close(span, started, "failed", exc.message)
            raise RelayRefused(exc.code, exc.message, {"error": exc.message}) from None
        if method == SAMPLE:
            used = self.governor.counter.count(_text_of(params.get("messages"))) + self.governor.counter.count(
                _text_of(result.get("content"))
            )
            self.sampled_tokens += used
            span["tokens"] = used
        elif method == ELICIT:
            span["answer"] = result.get("action")  # what the user did, never what they typed
        self._close(span, started, "answered")
        return result

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        """A log message or progress from the upstream, passed on (progress under the agent's token)."""
        if method == "notifications/progress":
            if self.progress_token is None:
                return
            params = {**params, "progressToken": self.progress_token}
        await self.channel.notify(method, params)

    def _room(self, call: Call) -> int | None:
        budget = call.budget
        if budget is None or not budget.reserved_tokens:
            return None
        return max(0, budget.reserved_tokens - call.tokens_in - self.sampled_tokens)

    def _estimate(self, params: Mapping[str, Any]) -> int:
        asked = params.get("maxTokens")
        prompt = self.governor.counter.count(_text_of(params.get("messages"))) + self.governor.counter.count(
            str(params.get("systemPrompt") or "")
        )
        return prompt + (asked if isinstance(asked, int) and asked > 0 else 0)

    def _refuse(
        self, span: dict[str, Any], stage: str, *reasons: str, outcome: str = "denied", code: int = INVALID_REQUEST
    ) -> RelayRefused:
        span |= {"decision": "deny", "stage": stage, "reasons": list(reasons), "outcome": outcome}
        self.spans.append(span)
        body = {"decision": "deny", "stage": stage, "action": span["action"], "reasons": list(reasons)}
        log.info("relay_refused", action=span["action"], upstream=span.get("upstream"), stage=stage, reasons=reasons)
        return RelayRefused(code, f"refused by the gateway: {json.dumps(body)}", body)

    def _close(self, span: dict[str, Any], started: float, outcome: str, error: str | None = None) -> None:
        span |= {"outcome": outcome, "ms": round((time.time() - started) * 1000, 3)}
        if error:
            span["error"] = error[:300]
        self.spans.append(span)


def _text_of(value: Any) -> str:
    """The text a sampling message list (or a result's content) holds, for counting tokens."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)
