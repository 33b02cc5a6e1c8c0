"""The decision input: one function builds it from a `Call`, and it is checked against the versioned schema."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import fastjsonschema
import regex  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator

from server.call import Budget, Call, GrantCheck

SCHEMA_VERSION = "v2"
_SCHEMA = json.loads(
    (resources.files("server.policy") / "schema" / f"decision-input.{SCHEMA_VERSION}.json").read_text()
)
# The schema is ours, so compiling it to Python (fastjsonschema, ~15x faster than jsonschema on the
# hot path) is safe; jsonschema is used only to explain a failure. Tool schemas from upstream
# servers are never compiled this way.
_FORMATS = {"date-time": r"^\d{4}-\d{2}-\d{2}T"}
_FAST = fastjsonschema.compile(_SCHEMA, formats=_FORMATS)
_VALIDATOR = Draft202012Validator(_SCHEMA)


def build_input(call: Call) -> dict[str, Any]:
    """The document both policy engines receive for `call` (see `schema/decision-input.v2.json`)."""
    if call.identity is None or call.tool is None:
        raise ValueError("a decision input needs an identity and a tool")
    budget = call.budget or Budget()
    grants = call.grants or GrantCheck()
    arguments = canonical(dict(call.arguments))
    document = {
        "version": SCHEMA_VERSION,
        "identity": call.identity.as_input(),
        "tool": call.tool.spec.as_input(),
        "action": call.action,
        "arguments": arguments,
        "normalized": {"arguments": normalized(arguments), "strings": normalized_strings(arguments)},
        "run": {
            "run_id": call.run.run_id,
            "depth": call.run.depth,
            "calls": budget.run_calls,
            "repeats": budget.repeats,
        },
        "grants": {"has": list(grants.has), "missing": list(grants.missing)},
        "budget": {
            "tokens_used": budget.tokens_used,
            "tokens_limit": budget.tokens_limit,
            "calls_this_minute": budget.calls_this_minute,
            # Counted per identity over sliding windows, whatever run the caller declares.
            "identical_calls": budget.identical_calls,
            "identical_calls_limit": budget.identical_calls_limit,
            "identical_calls_window_seconds": budget.identical_calls_window_seconds,
            "tool_calls": budget.tool_calls,
            "tool_calls_limit": budget.tool_calls_limit,
            "tool_calls_window_seconds": budget.tool_calls_window_seconds,
        },
        "time": datetime.fromtimestamp(call.started_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "detections": [dict(d) for d in call.detections],  # server/guardrails: what was found, never the value
    }
    target_input = getattr(call.tool, "decision_input", None)  # a resource, prompt or completion target
    if target_input is not None:
        document.update(target_input(call.arguments))
    upstream = getattr(call.tool, "upstream_input", None)  # an upstream's tool: which credential it carries
    if upstream is not None:
        document["upstream"] = upstream()
    return document


def result_input(call: Call, detections: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The after-call document for `call`'s result (`action` "result"): the call's document, its
    detections those of the result."""
    document = build_input(call)
    document["action"] = "result"
    document["detections"] = [dict(d) for d in detections]
    return document


RECOMPUTED = ("arguments", "normalized")
"""What a recorded decision input leaves out: the record keeps the (redacted) arguments, and the
normalised views are computed from them again (`replay_document`)."""


def recorded_input(document: Mapping[str, Any]) -> dict[str, Any]:
    """`document` as the audit record keeps it for replay: without `RECOMPUTED`."""
    return {k: v for k, v in document.items() if k not in RECOMPUTED}


def replay_document(recorded: Mapping[str, Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The decision input rebuilt from a record: `recorded_input` plus the record's arguments."""
    arguments = canonical(dict(arguments))
    return {
        **recorded,
        "arguments": arguments,
        "normalized": {"arguments": normalized(arguments), "strings": normalized_strings(arguments)},
    }


def build_relay_input(call: Call, action: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The document for a request an upstream raised during `call` (action sample, elicit or roots):
    the call's own document, its action replaced, with the request as `request` (method, params, and
    every string in the params normalised as in `normalized.strings`)."""
    document = build_input(call)
    request = canonical(dict(params))
    document["action"] = action
    document["request"] = {"method": method, "params": request, "strings": normalized_strings(request)}
    return document


def canonical(value: Any) -> Any:
    """`value` with every integral float made an integer (`1.0` → `1`, `-0.0` → `0`).

    JSON does not tell 1.0 from 1, but engines print them differently inside composite values
    (OPA keeps the literal `1.0`, regorus writes `1`; regorus keeps the sign of -0 after arithmetic,
    OPA does not). No decision should hang on how a client spelled a number.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


# What renders as nothing or is not text: controls, format characters (zero-width space and joiners,
# soft hyphen, bidi marks, BOM), private use, surrogates, unassigned code points and the other
# default-ignorable ones (variation selectors, Hangul fillers...). Whitespace is made spaces first.
_ASCII_INVISIBLE = dict.fromkeys(
    c for c in range(128) if chr(c).isascii() and not chr(c).isprintable() and not chr(c).isspace()
)
_INVISIBLE = regex.compile(r"[\p{Cc}\p{Cf}\p{Co}\p{Cs}\p{Cn}\p{Default_Ignorable_Code_Point}]+")


def normalized_text(text: str) -> str:
    """`text` as a matching rule should see it: NFKC, case-folded (NFKC again, since folding can
    un-normalise), invisible characters removed, whitespace runs (Unicode's) made one space, ends trimmed.
    Full-width "DROP", a zero-width joiner, a tab and a soft hyphen in "Ta-ble" give "drop table"."""
    if text.isascii():  # NFKC leaves ASCII as it is, and folding it is lower-casing: the fast path
        return " ".join(text.lower().translate(_ASCII_INVISIBLE).split())
    text = " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold()).split())
    return " ".join(_INVISIBLE.sub("", text).split())


def normalized_strings(arguments: Mapping[str, Any]) -> list[list[str]]:
    """Every string at any depth of `arguments` (keys too), normalised, as `[argument name, text]` pairs:
    a rule can match text wherever it sits without `walk` (outside the regorus fallback's verified set)."""
    found: list[list[str]] = []
    for name, value in arguments.items():
        _visit_strings(name, value, found)
    return found


def _visit_strings(name: str, value: Any, found: list[list[str]]) -> None:
    # A module function, not a closure calling itself: that closure is a reference cycle per call,
    # which only the cyclic collector frees.
    if isinstance(value, str):
        found.append([name, normalized_text(value)])
    elif isinstance(value, dict):
        for key, item in value.items():
            found.append([name, normalized_text(key)])
            _visit_strings(name, item, found)
    elif isinstance(value, list):
        for item in value:
            _visit_strings(name, item, found)


def normalized(value: Any) -> Any:
    """`value` with every string in it `normalized_text`; keys, numbers and structure unchanged."""
    if isinstance(value, str):
        return normalized_text(value)
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def schema_errors(document: Any) -> list[str]:
    """Every way `document` breaks the schema, as `path: message`; empty when it is valid."""
    if _surely_valid(document):
        return []
    try:
        _FAST(document)
        return []
    except fastjsonschema.JsonSchemaException as exc:
        fast_message = str(exc)
    detailed = [
        f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in _VALIDATOR.iter_errors(document)
    ]
    return detailed or [fast_message]


def input_problem(document: Any) -> str | None:
    """The deny reason for an input that breaks the schema (both engines use it), or None when valid."""
    problems = schema_errors(document)
    return f"decision input invalid: {problems[0]}" if problems else None


# -- the schema check's fast path -------------------------------------------------------------------
#
# `_FAST` walks a whole document on every decision (~20 µs). `_surely_valid` says True only for a
# document the schema accepts, and costs a few µs for the gateway's own: each top-level part is
# checked by a check made for its subschema, when the subschema is one it was made for (compared at
# import, descriptions aside: a schema edit it does not know sends that part to a compiled validator
# of its own subschema). The identity and tool parts are the same call after call for an agent and a
# tool: one equal to a part that validated before (with objects where the schema wants them) is valid.
# False means "not known valid": `_FAST` then decides, and `_VALIDATOR` explains. test_input_checked.py
# checks that the two always agree.


def _plain(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


_PROPERTIES: dict[str, Any] = {name: _plain(sub) for name, sub in _SCHEMA["properties"].items()}
_REQUIRED = frozenset(_SCHEMA["required"])
_TIME = re.compile(_FORMATS["date-time"])
_COUNT, _TEXT, _TEXTS = "count", "text", "texts"
_LEAVES = {
    _COUNT: {"type": "integer", "minimum": 0},  # a non-negative int, bool excepted
    _TEXT: {"type": "string"},
    _TEXTS: {"type": "array", "items": {"type": "string"}},
}
_PAIRS = {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}}


def _compiled(name: str) -> Any:
    return fastjsonschema.compile(_SCHEMA["properties"][name], formats=_FORMATS)


def _by_validator(check: Any) -> Any:
    def valid(value: Any) -> bool:
        try:
            check(value)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return valid


def _flat(schema: Mapping[str, Any]) -> Any:
    """A check for a closed object whose every member is one of `_LEAVES` (`run`, `grants`, `budget`),
    or None for any other schema."""
    if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
        return None
    if set(schema) - {"type", "required", "additionalProperties", "properties"}:
        return None
    kinds: dict[str, str] = {}
    for key, leaf in schema.get("properties", {}).items():
        kind = next((kind for kind, shape in _LEAVES.items() if leaf == shape), None)
        if kind is None:
            return None
        kinds[key] = kind
    required = frozenset(schema.get("required", ()))

    def valid(value: Any) -> bool:
        if type(value) is not dict or not value.keys() >= required:
            return False
        for key, member in value.items():
            kind = kinds.get(key)
            if kind is _COUNT:
                if type(member) is not int or member < 0:
                    return False
            elif kind is _TEXT:
                if type(member) is not str:
                    return False
            elif kind is _TEXTS:
                if type(member) is not list or not all(type(text) is str for text in member):
                    return False
            else:
                return False
        return True

    return valid


def _normalized_ok(value: Any) -> bool:
    if type(value) is not dict or type(value.get("arguments")) is not dict:
        return False
    strings = value.get("strings", ())
    if strings == ():
        return True
    if type(strings) is not list:
        return False
    for pair in strings:
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
            return False
    return True


def _known(name: str, key: str, objects: tuple[str, ...]) -> Any:
    """A check for a part seen again and again (`identity` by agent, `tool` by name): equal to a copy
    of one that validated, with a dict wherever that one had a dict (`objects`: members holding an
    object, or a list of them), is valid; anything else is validated, and remembered when valid."""
    compiled = _by_validator(_compiled(name))
    seen: dict[str, Any] = {}

    def valid(value: Any) -> bool:
        if type(value) is not dict:
            return False
        for member in objects:
            inner = value.get(member)
            if type(inner) is list:
                if not all(type(item) is dict for item in inner):
                    return False
            elif inner is not None and type(inner) is not dict:
                return False
        which = value.get(key)
        if type(which) is str and seen.get(which) == value:
            return True
        if not compiled(value):
            return False
        if type(which) is str:
            try:
                copy = json.loads(json.dumps(value))  # a copy: the document may be edited later
            except (TypeError, ValueError, RecursionError):  # an annotation JSON cannot hold: not remembered
                return True
            if len(seen) >= 4096:
                seen.clear()
            seen[which] = copy
        return True

    return valid


def _part_checks() -> dict[str, Any]:
    # Each entry: the subschema its check was made for (None: any; the check is its own guard), the check.
    made_for: dict[str, tuple[Any, Any]] = {
        "version": ({"const": SCHEMA_VERSION}, lambda v: type(v) is str and v == SCHEMA_VERSION),
        "action": (None, None),
        "arguments": ({"type": "object"}, lambda v: type(v) is dict),
        "normalized": (
            {
                "type": "object",
                "required": ["arguments"],
                "properties": {"arguments": {"type": "object"}, "strings": _PAIRS},
            },
            _normalized_ok,
        ),
        "time": ({"type": "string", "format": "date-time"}, lambda v: type(v) is str and _TIME.search(v) is not None),
        "identity": (None, _known("identity", "agent_id", ("principals",))),
        "tool": (None, _known("tool", "name", ("annotations",))),
    }
    checks: dict[str, Any] = {}
    for name, schema in _PROPERTIES.items():
        expected, check = made_for.get(name, (None, None))
        if name == "action" and set(schema) == {"enum"} and all(type(v) is str for v in schema["enum"]):
            actions = frozenset(schema["enum"])
            check = lambda v, actions=actions: type(v) is str and v in actions  # noqa: E731
        elif expected is not None and schema != expected:
            check = None  # the schema changed under this check: its own subschema's validator instead
        elif name == "detections":
            compiled = _by_validator(_compiled(name))
            check = lambda v, compiled=compiled: (type(v) is list and not v) or compiled(v)  # noqa: E731
        checks[name] = check or _flat(schema) or _by_validator(_compiled(name))
    return checks


_PART_CHECKS = _part_checks()


def _surely_valid(document: Any) -> bool:
    """True only when `document` validates against the schema (False: it may not; check it whole)."""
    if not isinstance(document, dict) or not document.keys() >= _REQUIRED:
        return False
    checks = _PART_CHECKS
    for name, value in document.items():
        check = checks.get(name)
        if check is None or not check(value):
            return False
    return True
