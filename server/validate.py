"""Pipeline stage: check a call's arguments against its tool's compiled input schema."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import structlog

from server.call import Call
from server.errors import Denied, InvalidArguments
from server.registry import ToolRegistry
from server.tool_schema import MAX_STEPS, SchemaRefused, StepsExhausted, first_error_bounded

log = structlog.get_logger("castellan.validate")

# I-JSON (RFC 7493): numbers a double holds exactly. Beyond them engines (and JSON parsers) round
# differently, and a decision must not depend on how a number was rounded.
_MAX_SAFE_INTEGER = 2**53 - 1


def _interoperable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER
    if isinstance(value, Mapping):
        return all(_interoperable(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_interoperable(v) for v in value)
    return True


class ValidateStage:
    """Validates `tools/call` arguments, so policy only ever sees well-typed ones; arguments that
    break the schema (or the tool's own rules, like the SQL tool's read-only check) stop the call with
    `InvalidArguments`. Runs after grants: cheap refusals come first.

    Bounded cost: the schema was checked and compiled when the tool was registered (patterns on RE2,
    nothing fetched); a validation takes at most `INLINE_STEPS` on the event loop, is restarted on a
    worker thread (two at a time) when it needs more, and is refused beyond `max_steps`.
    """

    name = "validate"

    def __init__(self, registry: ToolRegistry, max_steps: int = MAX_STEPS) -> None:
        self._registry = registry
        self._max_steps = max_steps

    async def run(self, call: Call) -> Call:
        if call.action not in ("call", "prompt"):  # a prompt's arguments are checked against its own
            return call
        assert call.tool is not None
        try:
            interoperable = _interoperable(call.arguments)
        except RecursionError:
            raise InvalidArguments(self.name, "arguments: nested too deeply") from None
        if not interoperable:
            raise InvalidArguments(
                self.name, "arguments: numbers must be finite and integers within ±(2^53-1) (I-JSON, RFC 7493)"
            )
        try:
            validator = self._registry.validator(call.tool)
        except SchemaRefused as exc:  # a blocked tool is denied earlier; fail closed regardless
            raise Denied(self.name, f"tool {call.tool.spec.name}: input schema refused: {exc.reason}") from None
        try:
            problem = await first_error_bounded(validator, call.arguments, self._max_steps)
        except StepsExhausted:
            log.warning("validation_too_costly", tool=call.tool.spec.name, call_id=call.call_id)
            problem = (
                f"arguments: validating them against the schema of {call.tool.spec.name} takes more than "
                f"{self._max_steps:,} steps (tools.max_validation_steps)"
            )
        if problem:
            raise InvalidArguments(self.name, problem)
        check = getattr(call.tool, "check_arguments", None)  # a tool's own rules (the SQL tool: read-only)
        problem = check(call.arguments) if check is not None else None
        if problem:
            raise InvalidArguments(self.name, str(problem)[:500])
        return call
