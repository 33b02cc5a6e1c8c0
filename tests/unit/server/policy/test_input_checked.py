"""The schema check's fast path (`_surely_valid`) never changes what the check says: for any
document, built or edited, `schema_errors` is exactly what the full validation says; and the
gateway's own inputs take the fast path."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import fastjsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.call import Budget, Call, GrantCheck, RunInfo
from server.identity import Identity
from server.policy import _input
from server.policy._input import build_input, build_relay_input, input_problem, result_input, schema_errors
from server.registry import ToolSpec
from tests.fakes.backends import FakeTool, make_call
from tools.echo import EchoTool

# Mostly what the gateway holds, with what a bug (or a Python caller) could put there instead.
texts = st.text(max_size=8)
counts = st.one_of(st.integers(min_value=0, max_value=10**6), st.integers(min_value=-3, max_value=-1), st.booleans(),
                   st.floats(min_value=0, max_value=3), st.none())  # fmt: skip
names = st.one_of(texts, st.integers(), st.none())
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)
identities = st.builds(
    Identity,
    agent_id=st.one_of(texts, st.integers()),
    subject=names,
    issuer=texts,
    groups=st.one_of(st.tuples(), st.lists(names, max_size=3).map(tuple)),
    scopes=st.one_of(st.tuples(), st.lists(names, max_size=2).map(tuple)),
    subject_kind=st.sampled_from([None, "user", "service_principal", "group", "robot"]),
    agent_is_subject=st.booleans(),
)
budgets = st.builds(
    Budget,
    tokens_used=counts,
    tokens_limit=counts,
    calls_this_minute=counts,
    run_calls=counts,
    repeats=counts,
    identical_calls=counts,
    tool_calls=counts,
    identical_calls_window_seconds=counts,
)
grants = st.builds(
    GrantCheck, has=st.lists(names, max_size=3).map(tuple), missing=st.lists(names, max_size=2).map(tuple)
)
detections = st.lists(
    st.dictionaries(st.sampled_from(["kind", "where", "field", "count", "path"]), st.one_of(texts, counts), max_size=3),
    max_size=2,
)
actions = st.sampled_from(["call", "list", "read", "prompt", "result", "sample", "delete", ""])


class TargetTool(FakeTool):
    """A tool whose target and upstream add their own parts (as resources, prompts and upstream tools do)."""

    def __init__(self, target: Mapping[str, Any] | None, upstream: Any) -> None:
        super().__init__()
        self._target, self._upstream = target, upstream

    def decision_input(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._target or {})

    def upstream_input(self) -> Any:
        return self._upstream


targets = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "resource": st.fixed_dictionaries(
                {
                    "uri": texts,
                    "name": names,
                    "template": st.one_of(st.none(), texts),
                    "mime_type": st.none(),
                    "upstream": st.none(),
                }
            )
        }
    ),
    st.fixed_dictionaries({"prompt": st.fixed_dictionaries({"name": names, "upstream": st.none()})}),
    st.fixed_dictionaries({"arguments": json_values}),  # a target that replaces a built part
    st.fixed_dictionaries({"unknown": texts}),
)
upstreams = st.one_of(
    st.just(None), st.fixed_dictionaries({"name": texts, "credential": st.sampled_from(["gateway", "x"])})
)
tools = st.one_of(
    st.just(FakeTool()),
    st.builds(
        lambda name, upstream: FakeTool(
            spec=ToolSpec(name=name, description="", securable="main.t.x", input_schema={}, upstream=upstream)
        ),
        st.sampled_from(["a", "tool.b"]),
        st.one_of(st.none(), texts),
    ),
    st.builds(TargetTool, targets, upstreams),
)
# The gateway's own values: what it builds calls from.
valid_counts = st.integers(min_value=0, max_value=10**6)
valid = {
    "identity": st.builds(
        Identity,
        agent_id=texts.filter(bool),
        subject=texts,
        issuer=texts,
        groups=st.lists(texts, max_size=3).map(tuple),
    ),
    "tool": st.just(FakeTool()),
    "action": st.just("call"),
    "arguments": st.dictionaries(texts, json_values, max_size=3),
    "run": st.builds(RunInfo, run_id=texts, depth=valid_counts),
    "budget": st.builds(Budget, tokens_used=valid_counts, calls_this_minute=valid_counts),
    "grants": st.builds(GrantCheck, has=st.lists(texts, max_size=3).map(tuple)),
    "detections": st.just(()),
    "started_at": st.floats(min_value=0, max_value=4e9),
}
# ... and, one field at a time, anything at all there.
wide = {
    "identity": identities,
    "tool": tools,
    "action": actions,
    "arguments": st.dictionaries(st.one_of(texts, st.integers()), json_values, max_size=3),
    "run": st.builds(RunInfo, run_id=st.one_of(texts, st.integers()), depth=counts),
    "budget": st.one_of(st.none(), budgets),
    "grants": st.one_of(st.none(), grants),
    "detections": detections.map(tuple),
    "started_at": st.floats(min_value=-6.2e10, max_value=2.5e11),  # years 1 to 9999
}


@st.composite
def calls(draw: st.DrawFn) -> Call:
    odd = draw(st.sampled_from([None, *wide]))
    return make_call(**{name: draw(wide[name] if name == odd else strategy) for name, strategy in valid.items()})


def _full_errors(document: Any) -> list[str]:
    """What `schema_errors` said before it had a fast path: the compiled schema, then jsonschema."""
    try:
        _input._FAST(document)
        return []
    except fastjsonschema.JsonSchemaException as exc:
        fast_message = str(exc)
    detailed = [
        f"{'/'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in _input._VALIDATOR.iter_errors(document)
    ]
    return detailed or [fast_message]


def _agrees(document: Any) -> None:
    assert schema_errors(document) == _full_errors(document)


def _built(build: Any) -> Any:
    try:
        return build()
    except (AttributeError, TypeError, ValueError):  # a non-text key deep in the arguments, a time out of range
        return None


@settings(max_examples=400, deadline=None)
@given(calls())
def test_a_built_input_is_checked_exactly_as_the_schema_says(call: Call) -> None:
    document = _built(lambda: build_input(call))
    if document is not None:
        _agrees(document)
        _agrees(document)  # again, now that its identity and tool are known


@settings(max_examples=200, deadline=None)
@given(st.builds(TargetTool, targets, upstreams), st.data())
def test_what_a_target_or_an_upstream_adds_is_checked_exactly(tool: TargetTool, data: st.DataObject) -> None:
    document = _built(lambda: build_input(data.draw(calls()).evolve(tool=tool)))
    if document is not None:
        _agrees(document)


@settings(max_examples=200, deadline=None)
@given(calls(), detections, st.dictionaries(texts, json_values, max_size=3))
def test_the_result_and_relay_inputs_are_checked_exactly(
    call: Call, found: list[dict[str, Any]], params: dict[str, Any]
) -> None:
    for document in (
        _built(lambda: result_input(call, found)),
        _built(lambda: build_relay_input(call, "sample", "sampling/createMessage", params)),
    ):
        if document is not None:
            _agrees(document)


# An edit anywhere: a value of any JSON type, or a tuple, a mapping that is not a dict, a bool for an int.
edits = st.one_of(json_values, st.tuples(texts), st.just(MappingProxyType({"type": "group", "name": "g"})),
                  st.just(True), st.just(-1), st.just(1.0))  # fmt: skip


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, member in value.items():
            found += _paths(member, (*prefix, key))
    elif isinstance(value, list):
        for index, member in enumerate(value):
            found += _paths(member, (*prefix, index))
    return found


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_an_input_edited_after_its_parts_were_seen_is_checked_exactly(data: st.DataObject) -> None:
    document = _built(lambda: build_input(data.draw(calls())))
    if document is None:
        return
    schema_errors(document)  # its identity and tool are now known, if valid
    path = data.draw(st.sampled_from(_paths(document)))
    target = document
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(edits)
    _agrees(document)


AS_PROXY = object()  # the value there, as a mapping that is not a dict (equal to it, invalid)
EDITS: list[tuple[tuple[Any, ...], Any]] = [
    (("identity", "principals", 0), AS_PROXY),
    (("identity",), AS_PROXY),
    (("tool", "annotations"), AS_PROXY),
    (("tool",), AS_PROXY),
    (("run",), AS_PROXY),
    (("normalized", "strings"), [["text"]]),
    (("normalized", "strings"), [["text", "hi", "x"]]),
    (("normalized", "strings"), [("text", "hi")]),
    (("normalized", "strings"), [["text", 1]]),
    (("normalized", "strings"), ()),
    (("normalized", "strings"), "text"),
    (("normalized", "strings"), ""),
    (("normalized", "strings"), None),
    (("normalized", "arguments"), []),
    (("normalized", "extra"), 1),
    (("identity", "principals", 0), MappingProxyType({"type": "group", "name": "g"})),
    (("identity", "principals", 0, "type"), "robot"),
    (("identity", "principals"), MappingProxyType({})),
    (("identity", "groups"), ("analysts",)),
    (("identity", "agent_id"), ""),
    (("tool", "annotations"), MappingProxyType({})),
    (("tool", "annotations"), None),
    (("tool", "annotations", "x"), {1, 2}),
    (("tool", "name"), 7),
    (("time",), "12:00:00"),
    (("time",), "999-01-01T00:00:00Z"),
    (("time",), 0),
    (("version",), "v1"),
    (("action",), "delete"),
    (("run", "depth"), True),
    (("run", "depth"), 1.0),
    (("budget", "tokens_used"), -1),
    (("grants", "has"), ("EXECUTE",)),
    (("detections",), [{"count": -1}]),
    (("arguments",), MappingProxyType({})),
    (("upstream",), {"name": "u", "credential": "stolen"}),
    (("resource",), {"uri": "x"}),
    ((1,), "not a text key"),
]


@pytest.mark.parametrize(("path", "value"), EDITS)
def test_each_kind_of_edit_is_checked_exactly(path: tuple[Any, ...], value: Any) -> None:
    call = make_call(tool=EchoTool(), tool_name="echo", arguments={"text": "hi"})
    assert schema_errors(build_input(call)) == []  # its identity and tool are known now
    document = build_input(call)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = MappingProxyType(target[path[-1]]) if value is AS_PROXY else value
    _agrees(document)


@pytest.mark.parametrize("name", sorted(_input._REQUIRED))
def test_an_input_without_a_required_part_is_checked_exactly(name: str) -> None:
    document = build_input(make_call())
    del document[name]
    _agrees(document)


def test_the_gateways_own_inputs_take_the_fast_path() -> None:
    for call in (
        make_call(budget=Budget(tokens_used=3), grants=GrantCheck(has=("EXECUTE",))),
        make_call(tool=EchoTool(), tool_name="echo", arguments={"text": "hi", "n": [1, {"k": "v"}]}),
        make_call(detections=({"kind": "email", "where": "arguments", "count": 1},)),
    ):
        assert _input._surely_valid(build_input(call))
        assert _input._surely_valid(result_input(call, []))


def test_an_input_that_breaks_the_schema_gets_the_schemas_reason() -> None:
    document = build_input(make_call(budget=Budget(tokens_used=-1)))
    assert input_problem(document) == "decision input invalid: budget/tokens_used: -1 is less than the minimum of 0"
    edited = build_input(make_call())
    schema_errors(edited)
    edited["identity"]["groups"] = "admins"  # an edit in place, of an identity seen valid before
    assert input_problem(edited) == "decision input invalid: identity/groups: 'admins' is not of type 'array'"
