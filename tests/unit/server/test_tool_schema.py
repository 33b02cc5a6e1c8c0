"""Tool input schemas are checked at registration and validated at a bounded cost, never fetching."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import ConfigError, InvalidArguments
from server.registry import ToolRegistry, ToolSpec
from server.tool_schema import MAX_STEPS, SchemaRefused, StepsExhausted, _Budget, _valid, compile_arguments
from server.validate import ValidateStage
from tests.fakes.backends import FakeTool, make_call

pytestmark = pytest.mark.anyio


@pytest.fixture
def counting_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that serves a schema and counts the requests it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("content-type", "application/schema+json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()


def tool_with(schema: dict[str, Any]) -> FakeTool:
    return FakeTool(spec=ToolSpec(name="t", description="", securable="main.tools.t", input_schema=schema))


@pytest.mark.parametrize(
    ("ref", "where"),
    [("{url}/s.json", "properties"), ("{url}/s.json#/x", "items"), ("//127.0.0.1:9/x", "properties"),
     ("other.json", "properties")],
)  # fmt: skip
def test_a_remote_reference_is_refused_and_never_fetched(
    counting_server: tuple[str, list[str]], ref: str, where: str
) -> None:
    url, hits = counting_server
    target = {"$ref": ref.format(url=url)}
    schema = {"type": "object", "properties": {"a": target}} if where == "properties" else {"items": target}
    with pytest.raises(SchemaRefused, match="not a local reference"):
        compile_arguments(schema)
    with pytest.raises(ConfigError, match="input schema refused"):
        ToolRegistry([tool_with(schema)])
    assert hits == []


async def test_a_reference_that_slips_past_the_check_still_fetches_nothing(
    counting_server: tuple[str, list[str]],
) -> None:
    url, hits = counting_server
    # "#..." is local by its spelling, but with a remote base URI it would resolve remotely.
    schema = {"$id": f"{url}/root.json", "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    problem = compile_arguments(schema).first_error({"a": 1})
    assert problem is not None
    assert "does not resolve" in problem
    assert hits == []


@pytest.mark.parametrize(
    "pattern",
    [r"(?=a)b", r"(a)\1", r"(?<!x)y", "[", "(x{1000}){1000}", "a" * 3000],
    ids=["lookahead", "backreference", "lookbehind", "invalid", "huge-repetition", "too-long"],
)
def test_a_pattern_re2_cannot_run_is_refused_with_the_reason(pattern: str) -> None:
    for schema in (
        {"properties": {"a": {"type": "string", "pattern": pattern}}},
        {"patternProperties": {pattern: {"type": "string"}}},
        {"properties": {"a": {"propertyNames": {"pattern": pattern}}}},
    ):
        with pytest.raises(SchemaRefused, match="pattern"):
            compile_arguments(schema)


def test_oversized_and_overdeep_schemas_are_refused() -> None:
    with pytest.raises(SchemaRefused, match="bytes"):
        compile_arguments({"enum": ["x" * 1000] * 200})
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"properties": {"a": deep}}
    with pytest.raises(SchemaRefused, match="deeper"):
        compile_arguments(deep)


async def test_a_catastrophic_pattern_is_evaluated_in_linear_time() -> None:
    # (a+)+$ backtracks exponentially in Python's re on "aaa…!"; RE2 runs it in linear time.
    tool = tool_with({"type": "object", "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}}})
    started = time.perf_counter()
    with pytest.raises(InvalidArguments, match="does not match"):
        await ValidateStage(ToolRegistry([tool])).run(make_call(tool=tool, arguments={"q": "a" * 50_000 + "!"}))
    assert time.perf_counter() - started < 30  # Python's re would not finish this in any test's lifetime
    keyed = tool_with({"type": "object", "patternProperties": {"^(a|aa)+$": {}}, "additionalProperties": False})
    with pytest.raises(InvalidArguments, match=r"do(es)? not match any of the regexes"):
        await ValidateStage(ToolRegistry([keyed])).run(make_call(tool=keyed, arguments={"a" * 40 + "!": 1}))


async def test_a_schema_that_multiplies_work_is_cut_off_at_the_step_limit() -> None:
    # Each level doubles the work on one value: 2^40 evaluations unbounded.
    defs: dict[str, Any] = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(40)}
    defs["d40"] = {"type": "string"}
    tool = tool_with({"$defs": defs, "type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}})
    with pytest.raises(StepsExhausted):
        compile_arguments(tool.spec.input_schema).first_error({"x": 1}, steps=5_000)
    with pytest.raises(InvalidArguments, match="more than 5,000 steps"):
        await ValidateStage(ToolRegistry([tool]), max_steps=5_000).run(make_call(tool=tool, arguments={"x": 1}))


async def test_a_reference_cycle_is_refused_as_a_call_not_a_crash() -> None:
    tool = tool_with({"$ref": "#"})
    with pytest.raises(InvalidArguments):
        await ValidateStage(ToolRegistry([tool])).run(make_call(tool=tool, arguments={"x": 1}))


async def test_ordinary_schemas_validate_as_before() -> None:
    schema = {
        "type": "object",
        "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}}}},
        "properties": {
            "code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"},
            "address": {"$ref": "#/$defs/address"},
            "tags": {"type": "array", "uniqueItems": True},
        },
        "patternProperties": {"^x-": {"type": "integer"}},
        "additionalProperties": False,
        "required": ["code"],
    }
    validator = compile_arguments(schema)
    assert validator.first_error({"code": "AB-123", "address": {"city": "Oslo"}, "x-n": 1, "tags": [1, 2]}) is None
    assert validator.first_error({"code": "ab"}) == "code: 'ab' does not match '^[A-Z]{2}-\\\\d{3}$'"
    assert validator.first_error({"code": "AB-123", "tags": [{"a": 1}, {"a": 1.0}]}) is not None
    assert validator.first_error({"code": "AB-123", "other": 1}) is not None
    assert validator.first_error({"code": "AB-123", "x-n": "one"}) == "x-n: 'one' is not of type 'integer'"
    assert validator.first_error({"code": "AB-123", "tags": [True, 1]}) is None  # true is not 1


# -- the fast path for simple schemas: it says "valid" exactly when jsonschema does ------------------

_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=5),
    st.sampled_from([0.0, 1.0, 2.5, -1.5, 3.0]),
    st.sampled_from(["", "a", "ab", "abc", "x-1", "é"]),
)
_VALUES = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_TYPE_NAMES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null"])


def _schemas(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keyword = st.one_of(
        st.tuples(st.just("type"), _TYPE_NAMES | st.lists(_TYPE_NAMES, min_size=1, max_size=3)),
        st.tuples(st.just("properties"), st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3)),
        st.tuples(st.just("required"), st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True)),
        st.tuples(st.just("additionalProperties"), st.booleans() | inner),
        st.tuples(st.just("items"), inner),
        st.tuples(st.just("enum"), st.lists(_LEAF, min_size=1, max_size=3)),
        st.tuples(st.just("const"), _VALUES),
        st.tuples(st.sampled_from(["minLength", "maxLength", "minItems", "maxItems"]), st.integers(0, 3)),
        st.tuples(
            st.sampled_from(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]),
            st.sampled_from([-1, 0, 1, 2.5, 3.0]),
        ),
        st.tuples(st.sampled_from(["description", "title", "default", "format"]), st.sampled_from(["uri", "x", 1])),
    )
    return st.lists(keyword, max_size=4).map(dict) | st.booleans()


_SIMPLE_SCHEMAS: st.SearchStrategy[Any] = st.recursive(st.booleans() | st.just({}), _schemas, max_leaves=6)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schema=_SIMPLE_SCHEMAS,
    dialect=st.sampled_from([None, "http://json-schema.org/draft-07/schema#"]),
    arguments=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), _VALUES, max_size=4),
)
def test_the_fast_path_finds_valid_exactly_what_jsonschema_finds_valid(
    schema: Any, dialect: str | None, arguments: dict[str, Any]
) -> None:
    if isinstance(schema, dict) and dialect is not None:
        schema = {"$schema": dialect, **schema}
    validator = compile_arguments(schema)
    assert validator._simple
    by_jsonschema = not list(validator._validator.iter_errors(arguments))
    assert (_valid(schema, arguments, _Budget(MAX_STEPS)) is True) == by_jsonschema
    expected = None if by_jsonschema else validator.first_error(arguments)
    assert validator.first_error(arguments) == expected  # an error is jsonschema's message


def test_schemas_outside_the_fast_path_are_left_to_jsonschema() -> None:
    for schema in (
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"type": "string"}}},
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}},
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        {"type": "array", "items": [{"type": "string"}]},
        {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}},
        {"type": "object", "properties": {"a": {"properties": {"b": {"$schema": "x"}}}}},
    ):
        assert not compile_arguments(schema)._simple


def test_the_fast_path_stops_at_the_step_budget() -> None:
    schema = {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}}
    assert _valid(schema, {"a": list(range(50))}, _Budget(20)) is None
    with pytest.raises(StepsExhausted):
        compile_arguments(schema).first_error({"a": list(range(50))}, steps=20)
