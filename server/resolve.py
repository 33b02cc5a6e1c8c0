"""Pipeline stage: resolve the requested tool and check the arguments against its input schema."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from jsonschema import Draft202012Validator

from server.call import Call
from server.errors import Denied, InvalidArguments
from server.registry import ToolRegistry

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


class ResolveStage:
    """Finds the tool and validates the arguments, before anything is metered or decided.

    An unknown name is a denial (audited like any other), not a protocol error; arguments that
    break the schema stop the call with `InvalidArguments`, so policy only ever sees well-typed ones.
    """

    name = "resolve"

    def __init__(self, registry: ToolRegistry) -> None:
        self._registry = registry
        self._validators: dict[str, tuple[Mapping[str, Any], Draft202012Validator]] = {}

    def _validator(self, name: str, schema: Mapping[str, Any]) -> Draft202012Validator:
        cached = self._validators.get(name)
        if cached is None or cached[0] is not schema:
            cached = (schema, Draft202012Validator(schema))
            self._validators[name] = cached
        return cached[1]

    async def run(self, call: Call) -> Call:
        tool = self._registry.get(call.tool_name)
        if tool is None:
            raise Denied(self.name, f"unknown tool {call.tool_name[:128]!r}")
        blocked = getattr(tool, "blocked_reason", None)  # a quarantined upstream tool: hidden and denied
        reason = blocked() if blocked is not None else None
        if reason:
            raise Denied(self.name, str(reason))
        if call.action == "call":
            if not _interoperable(call.arguments):
                raise InvalidArguments(
                    self.name, "arguments: numbers must be finite and integers within ±(2^53-1) (I-JSON, RFC 7493)"
                )
            validator = self._validator(tool.spec.name, tool.spec.input_schema)
            error = next(iter(sorted(validator.iter_errors(dict(call.arguments)), key=str)), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "arguments"
                raise InvalidArguments(self.name, f"{where}: {error.message[:300]}")
            check = getattr(tool, "check_arguments", None)  # a tool's own rules (the SQL tool: read-only)
            problem = check(call.arguments) if check is not None else None
            if problem:
                raise InvalidArguments(self.name, str(problem)[:500])
        return replace(call, tool=tool)
