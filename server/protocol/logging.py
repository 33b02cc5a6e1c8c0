"""MCP logging at the edge: `logging/setLevel` (2025 sessions) and the gateway's own log notifications,
one per governed act, saying what it decided (`notifications/message`, logger `castellan`)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import mcp_types as types
import structlog
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.call import Call

log = structlog.get_logger("castellan.protocol")

LEVELS: tuple[types.LoggingLevel, ...] = (
    "debug", "info", "notice", "warning", "error", "critical", "alert", "emergency",
)  # fmt: skip
LOGGER = "castellan"


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Any:
    """The client connection a request came on: the SDK makes a `ServerSession` per request, over the
    connection (the 2025 session) it belongs to."""
    return getattr(ctx.session, "_connection", ctx.session)


class LogLevels:
    """The level each 2025-era session asked for with `logging/setLevel` (none asked: nothing is sent).

    On 2026-07-28 there is no `logging/setLevel`: a request opts in with the reserved `_meta` log-level
    key, and the SDK session delivers only from that level up, on that request's stream. Connections
    are held weakly: a closed one is forgotten."""

    def __init__(self) -> None:
        self._levels: weakref.WeakKeyDictionary[Any, types.LoggingLevel] = weakref.WeakKeyDictionary()

    def level_of(self, ctx: ServerRequestContext[Any, Any]) -> types.LoggingLevel | None:
        """The level this request's 2025-era session set (None: it set none, or it is 2026-07-28)."""
        return self._levels.get(connection_of(ctx))

    def connection_level(self, connection: Any) -> types.LoggingLevel | None:
        """The level the 2025-era session on `connection` set (None: it set none)."""
        return self._levels.get(connection)

    async def set_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        self._levels[connection_of(ctx)] = params.level
        return types.EmptyResult()

    def wants(self, ctx: ServerRequestContext[Any, Any], level: types.LoggingLevel) -> bool:
        """A message at `level` may go to this request's client: on 2026-07-28 the SDK filters by the
        request's opt-in; on a 2025 session, only from the level it set. A request the edge's fast path
        serves (no SDK context: it serves only requests that asked for no log) gets none."""
        version = getattr(ctx, "protocol_version", None)
        if version is None:
            return False
        if version in MODERN_PROTOCOL_VERSIONS:
            return True
        wanted = self._levels.get(connection_of(ctx))
        return wanted is not None and LEVELS.index(level) >= LEVELS.index(wanted)

    async def decided(self, ctx: ServerRequestContext[Any, Any], call: Call) -> None:
        """Tell the client what the gateway decided for `call` (its request's stream); never raises."""
        error = call.error
        decision = "allow" if error is None else error.verdict
        level: types.LoggingLevel = "info" if decision == "allow" else "error" if decision == "error" else "warning"
        if getattr(ctx, "request_id", None) is None or not self.wants(ctx, level):
            return
        data: dict[str, Any] = {
            "event": "decision",
            "action": call.action,
            "target": call.tool_name[:256],
            "decision": decision,
            "call_id": call.call_id,
        }
        if error is not None:
            data |= {"stage": error.stage, "code": error.code, "reasons": list(error.reasons)}
        if call.decision is not None and call.decision.policy_version:
            data["policy_version"] = call.decision.policy_version
        try:
            with warnings.catch_warnings():  # deprecated at 2026-07-28, and served to 2025 clients on purpose
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await ctx.session.send_log_message(level, data, LOGGER, related_request_id=ctx.request_id)
        except Exception as exc:  # the client went away: the act is recorded already
            log.debug("decision_log_not_sent", call_id=call.call_id, error=repr(exc))
