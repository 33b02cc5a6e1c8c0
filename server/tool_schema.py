"""Tool input schemas, made safe to serve: checked once when a tool is registered, then compiled.

An upstream server's schema is untrusted input, read by the gateway on every call. `compile_arguments`
refuses a schema that would make validation fetch something (a `$ref` that is not local), cost without
bound (too large, too deep) or backtrack (a `pattern` that RE2 cannot run), and returns a validator
whose patterns all run on RE2 (linear time in the input) and whose work per call is capped in steps
(keyword evaluations), so a call's validation costs at most a known amount and never touches the
network. Raises `SchemaRefused` with the reason.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import re2  # type: ignore[import-untyped]
from jsonschema import Draft202012Validator, ValidationError, validators
from referencing import Registry
from referencing.exceptions import NoSuchResource, Unresolvable

MAX_SCHEMA_BYTES = 128 * 1024
"""A schema's size as compact JSON. The largest real MCP tool schemas are a few tens of KiB."""
MAX_SCHEMA_DEPTH = 32
"""Nesting of objects and arrays in the schema document."""
MAX_PATTERN_CHARS = 2_000
INLINE_STEPS = 1_000
"""Steps (keyword evaluations) a call's validation may take on the event loop (a few milliseconds);
beyond that it starts again on a worker thread (see `server.validate`)."""
MAX_STEPS = 100_000
"""Steps a call's validation may take at all (default of `tools.max_validation_steps`)."""
_RE2_MAX_MEM = 8 << 20

_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


class SchemaRefused(ValueError):
    """A schema the gateway will not serve; `reason` says why (shown to operators and callers)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StepsExhausted(Exception):
    """Validation took more keyword evaluations than it was given."""


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    return options


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Any:
    """`pattern` compiled by RE2. Raises `SchemaRefused` when RE2 cannot run it (backreferences,
    lookaround, possessive or too-large repetitions) or it is longer than `MAX_PATTERN_CHARS`."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaRefused(f"pattern of {len(pattern)} characters (the limit is {MAX_PATTERN_CHARS})")
    try:
        return re2.compile(pattern, options=_re2_options())
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise SchemaRefused(
            f"pattern {pattern[:120]!r} cannot run in linear time (RE2: {detail[:160]}); "
            "backreferences and lookaround are not supported"
        ) from None


def check_schema(schema: Any) -> None:
    """Refuses (`SchemaRefused`) a schema that is not an object or boolean, is larger than
    `MAX_SCHEMA_BYTES` or deeper than `MAX_SCHEMA_DEPTH`, has a non-local reference, or a
    `pattern` / `patternProperties` key that RE2 cannot compile."""
    if not isinstance(schema, Mapping | bool):
        raise SchemaRefused(f"the input schema is a {type(schema).__name__}, not an object")
    size = len(json.dumps(schema, separators=(",", ":"), default=str))
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused(f"the input schema is {size:,} bytes (the limit is {MAX_SCHEMA_BYTES:,})")
    uses_pattern_properties = uses_unevaluated = False
    stack: list[tuple[Any, str, int]] = [(schema, "", 0)]
    while stack:  # iterative: a hostile schema's depth must not become Python recursion
        node, where, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaRefused(f"the input schema nests deeper than {MAX_SCHEMA_DEPTH} levels (at {where})")
        if isinstance(node, list):
            stack.extend((item, f"{where}/{i}", depth + 1) for i, item in enumerate(node))
            continue
        if not isinstance(node, Mapping):
            continue
        for key, value in node.items():
            here = f"{where}/{key}"
            # Conservative on purpose: a "$ref" string anywhere (even inside `default` data) must be local.
            if key in _REF_KEYWORDS and isinstance(value, str) and not value.startswith("#"):
                raise SchemaRefused(
                    f"{key} {value[:200]!r} at {where or '/'} is not a local reference: only references into "
                    "the schema itself (#/...) are allowed, nothing is fetched"
                )
            if key == "pattern" and isinstance(value, str):
                _compile_at(value, here)
            elif key == "patternProperties" and isinstance(value, Mapping):
                uses_pattern_properties = True
                for pattern in value:
                    _compile_at(str(pattern), here)
            elif key == "unevaluatedProperties":
                uses_unevaluated = True
            stack.append((value, here, depth + 1))
    if uses_pattern_properties and uses_unevaluated:
        # jsonschema evaluates patternProperties for unevaluatedProperties with Python's backtracking re.
        raise SchemaRefused("unevaluatedProperties together with patternProperties is not supported")


def _compile_at(pattern: str, where: str) -> None:
    try:
        compile_pattern(pattern)
    except SchemaRefused as exc:
        raise SchemaRefused(f"{exc.reason} (at {where})") from None


@dataclass(slots=True)
class _Budget:
    remaining: int


_BUDGET: ContextVar[_Budget | None] = ContextVar("castellan_validation_budget", default=None)

Keyword = Callable[[Any, Any, Any, Mapping[str, Any]], Iterator[ValidationError] | None]


def _counted(keyword: Keyword, weight: int) -> Keyword:
    def counted(validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.remaining -= weight
            if budget.remaining < 0:
                raise StepsExhausted
        return keyword(validator, value, instance, schema)

    return counted


def _short(value: Any) -> str:
    """`repr(value)`, cut for a message (a value can be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:80]}… ({len(text):,} characters)"


def _search(pattern: str, text: str) -> bool:
    try:
        return compile_pattern(pattern).search(text) is not None
    except SchemaRefused:
        return False  # not reachable for a checked schema; a pattern that cannot run matches nothing


def _pattern(validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    declared = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in declared and not any(_search(p, k) for p in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(repr(e) for e in sorted(extras, key=str))
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            yield ValidationError(
                f"{names} {verb} not match any of the regexes: {', '.join(map(repr, sorted(patterns)))}"
            )
        else:
            verb = "was" if len(extras) == 1 else "were"
            yield ValidationError(f"Additional properties are not allowed ({names} {verb} unexpected)")


def _canonical(value: Any) -> Any:
    """A hashable form in which JSON-equal values are equal (1 == 1.0, but true != 1)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, int | float):
        return (
            "number",
            int(value) if isinstance(value, float) and math.isfinite(value) and value.is_integer() else value,
        )
    if isinstance(value, Mapping):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(_canonical(v) for v in value))
    return ("other", repr(value))


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    # jsonschema compares unhashable items pairwise (quadratic); this is linear.
    if unique and validator.is_type(instance, "array"):
        seen: set[Any] = set()
        for item in instance:
            key = _canonical(item)
            if key in seen:
                yield ValidationError(f"{_short(instance)} has non-unique elements")
                return
            seen.add(key)


_KEYWORDS: dict[str, Keyword] = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}
# A step is one keyword evaluation; following a reference costs about ten (resolving, re-entering).
_WEIGHTS = {"$ref": 10, "$dynamicRef": 10}
_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {name: _counted(fn, _WEIGHTS.get(name, 1)) for name, fn in _KEYWORDS.items()}
)


def _refuse_retrieval(uri: str) -> Any:
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


_NO_FETCH: Registry[Any] = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]


# The commonest tool schemas (an object of typed members, some required, maybe no others) use a few
# keywords whose meaning is plain; for them a direct check says whether arguments are valid at a
# fraction of jsonschema's cost (its per-keyword dispatch, error generators and the step counter).
# It only ever answers "valid": anything it does not know, and every invalid value, goes to jsonschema,
# so the errors (and their order) are jsonschema's. tests/unit/server/test_tool_schema.py pins that the
# two agree on what is valid.
_SIMPLE_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const",
        "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "minItems", "maxItems",
        # annotations: no assertion in draft 2020-12 (`format` asserts nothing without a format checker)
        "title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly", "format",
    }
)  # fmt: skip
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")


def _is_number(value: Any) -> bool:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


def _simple(schema: Any, root: bool = True) -> bool:
    """`schema` uses only keywords `_valid` knows, each in the form it knows."""
    if isinstance(schema, bool):
        return True
    if type(schema) is not dict:
        return False
    for key, value in schema.items():
        if key == "$schema" and root and isinstance(value, str):
            continue
        if key not in _SIMPLE_KEYWORDS:
            return False
        if key == "type":
            names = [value] if isinstance(value, str) else value
            if type(names) is not list or not names or not all(isinstance(n, str) and n in _TYPES for n in names):
                return False
        elif key == "properties":
            if type(value) is not dict or not all(_simple(sub, False) for sub in value.values()):
                return False
        elif key == "required":
            if type(value) is not list or not all(isinstance(n, str) for n in value):
                return False
        elif key in ("additionalProperties", "items"):
            if not _simple(value, False):
                return False
        elif key == "enum":
            if type(value) is not list or not all(_plain(v) for v in value):
                return False
        elif key == "const":
            if not _plain(value):
                return False
        elif key in _NUMBER_BOUNDS:
            if not _is_number(value):
                return False
        elif key in _COUNTS and (type(value) is not int or value < 0):
            return False
    return True


def _plain(value: Any) -> bool:
    """A JSON value `_canonical` compares as jsonschema does (no NaN or infinity in it)."""
    kind = type(value)
    if value is None or kind is str or kind is bool or kind is int:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def _of_type(value: Any, name: str) -> bool:
    kind = type(value)
    if name == "string":
        return kind is str
    if name == "object":
        return kind is dict
    if name == "array":
        return kind is list
    if name == "integer":
        return kind is int or (kind is float and value.is_integer())
    if name == "number":
        return kind is int or kind is float
    if name == "boolean":
        return kind is bool
    return value is None  # "null"


def _valid(schema: Any, value: Any, budget: _Budget) -> bool | None:
    """True when `value` is valid against the `_simple` `schema`; False or None (invalid, not known,
    or more than `budget` keywords) send it to jsonschema."""
    if schema is True:
        return True
    if schema is False:
        return False
    budget.remaining -= len(schema)
    if budget.remaining < 0:
        return None
    kind = type(value)
    if kind is float and not math.isfinite(value):
        return None
    if not (
        value is None or kind is str or kind is bool or kind is int or kind is float or kind is dict or kind is list
    ):
        return None
    names = schema.get("type")
    if names is not None:
        if isinstance(names, str):
            if not _of_type(value, names):
                return False
        elif not any(_of_type(value, n) for n in names):
            return False
    if "enum" in schema:
        if not _plain(value):
            return None
        key = _canonical(value)
        if not any(_canonical(option) == key for option in schema["enum"]):
            return False
    if "const" in schema and (not _plain(value) or _canonical(value) != _canonical(schema["const"])):
        return False
    if kind is str:
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            return False
    elif kind is int or kind is float:
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return False
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            return False
    elif kind is dict:
        if any(type(k) is not str for k in value):
            return None
        for name in schema.get("required", ()):
            if name not in value:
                return False
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties", True)
        for name, member in value.items():
            sub = properties.get(name, additional)
            if sub is True:
                continue
            ok = _valid(sub, member, budget)
            if ok is not True:
                return ok
    elif kind is list:
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return False
        items = schema.get("items", True)
        if items is not True:
            for item in value:
                ok = _valid(items, item, budget)
                if ok is not True:
                    return ok
    return True


class ArgumentsValidator:
    """A checked schema, compiled once; `first_error` validates arguments within a step budget."""

    def __init__(self, schema: Mapping[str, Any] | bool) -> None:
        check_schema(schema)
        self.schema = schema
        self._validator = _Validator(schema, registry=_NO_FETCH)
        self._simple = _simple(schema)

    def first_error(self, arguments: Mapping[str, Any], steps: int = MAX_STEPS) -> str | None:
        """The first problem with `arguments` (`path: message`), or None. Raises `StepsExhausted`
        after `steps` keyword evaluations; never fetches anything (non-local references were refused,
        and the reference registry retrieves nothing)."""
        if self._simple and type(arguments) is dict and _valid(self.schema, arguments, _Budget(steps)) is True:
            return None
        token = _BUDGET.set(_Budget(steps))
        try:
            errors = sorted(self._validator.iter_errors(dict(arguments)), key=str)
        except Unresolvable as exc:
            return f"arguments: the tool's schema has a reference that does not resolve ({str(exc)[:200]})"
        except RecursionError:
            return "arguments: nested too deeply to validate (or the schema refers to itself without end)"
        finally:
            _BUDGET.reset(token)
        if not errors:
            return None
        error = errors[0]
        where = "/".join(str(p) for p in error.absolute_path) or "arguments"
        return f"{where}: {error.message[:300]}"


@functools.lru_cache(maxsize=1024)
def _compiled_json(schema_json: str) -> ArgumentsValidator:
    return compile_arguments(json.loads(schema_json))


def compiled(schema: Mapping[str, Any] | bool) -> ArgumentsValidator:
    """`compile_arguments(schema)`, once per distinct schema (upstream tools are rebuilt at every
    refresh). Raises `SchemaRefused` (refusals are not cached: the check is cheap)."""
    return _compiled_json(json.dumps(schema, sort_keys=True, separators=(",", ":"), default=str))


_THREADS: anyio.CapacityLimiter | None = None


async def first_error_bounded(validator: ArgumentsValidator, value: Mapping[str, Any], max_steps: int) -> str | None:
    """`validator.first_error(value)` at a bounded cost to the event loop: `INLINE_STEPS` on it, then
    from the start on a worker thread (two at a time, process-wide) up to `max_steps`. Raises
    `StepsExhausted` beyond."""
    global _THREADS
    try:
        return validator.first_error(value, INLINE_STEPS)
    except StepsExhausted:
        if _THREADS is None:
            _THREADS = anyio.CapacityLimiter(2)
        return await anyio.to_thread.run_sync(validator.first_error, value, max_steps, limiter=_THREADS)


def compile_arguments(schema: Mapping[str, Any] | bool) -> ArgumentsValidator:
    """The compiled validator for a tool's input schema. Raises `SchemaRefused`."""
    return ArgumentsValidator(schema)
