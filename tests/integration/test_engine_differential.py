"""The embedded engine must decide exactly as the real OPA does: same allow, reasons and obligations,
over hand-written edge cases, adversarial values and hypothesis-generated inputs, for the default
policy and for an adversarial one. A mismatch fails CI."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.policy._input import build_input
from server.policy.bundle import PolicyBundle
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import Decision
from server.policy.opa import OpaServerEngine
from server.settings import REPO_ROOT
from server.testing import make_call, make_identity
from tests.opa import run_opa
from tools.echo import EchoTool
from tools.profile import ProfileTool
from tools.reset import ResetTool

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
BUNDLES = {
    "default": REPO_ROOT / "policies",
    "adversarial": Path(__file__).parent / "policies" / "adversarial",
}
TOOLS = [EchoTool(), ProfileTool(), ResetTool()]

# Values chosen where engines are known to slip: cross-type ordering, ints vs floats, big and tiny
# numbers, negative zero, unicode (combining marks, astral plane, RTL, zero-width), empty things.
# Only what the gateway lets through: the resolve stage refuses numbers outside I-JSON.
ODD_VALUES: list[Any] = [
    0,
    1,
    -1,
    1.0,
    1.5,
    -0.0,
    100,
    101,
    100.0000001,
    2**31,
    2**53 - 1,
    -(2**53 - 1),
    1e-7,
    1e21,
    3.14159,
    "1000",
    "100",
    "1",
    "",
    " ",
    "a",
    "ab",
    "abc",
    "ABC",
    "drop",
    "DROP TABLE",
    "Ünïcödé",
    "straße",
    "İ",
    "e\u0301",
    "😀",
    "a,b,,c",
    "  padded  ",
    "\u200b",
    "\u202eevil",
    "NaN",
    "1e3",
    "0x10",
    "-5",
    "+5",
    None,
    True,
    False,
    [],
    [1, 2, 3],
    [3, "a", None, True, 1.5],
    ["b", "a", "B"],
    {},
    {"b": 1, "a": [2]},
    {"z": {"y": [1, {"x": None}]}},
]


def document(
    arguments: dict[str, Any],
    tool_index: int = 0,
    groups: tuple[str, ...] = ("analysts",),
    depth: int = 0,
    calls: int = 1,
    repeats: int = 1,
    used: int = 0,
    limit: int = 1000,
    action: str = "call",
) -> dict[str, Any]:
    from server.call import Budget, RunInfo

    tool = TOOLS[tool_index % len(TOOLS)]
    call = make_call(
        tool=tool,
        tool_name=tool.spec.name,
        arguments=arguments,
        action=action,
        identity=make_identity(groups=groups),
        run=RunInfo(run_id="r", depth=depth),
        budget=Budget(tokens_used=used, tokens_limit=limit, run_calls=calls, repeats=repeats),
    )
    return build_input(call)


def hand_written() -> list[dict[str, Any]]:
    docs = [
        document({"text": "hi"}),
        document({"text": "x" * 200}),
        document({"text": "x" * 201}),
        document({"text": 5}),
        document({"text": None}),
        document({}),
        document({"text": "drop table x"}),
        document({"text": "DROP\u00a0TABLE"}),
        document({"customer_id": "c-001"}, 1),
        document({}, 2),
        document({}, 2, ("admins",)),
        document({}, 2, ()),
        document({}, 0, action="list"),
        document({"text": "x" * 500}, 0, action="list"),
        document({"text": "hi"}, used=1000, limit=1000),
        document({"text": "hi"}, used=5, limit=0),
    ]
    for value in ODD_VALUES:  # every odd value in every argument slot the policies look at
        docs.append(document({"n": value}))
        docs.append(document({"s": value}))
        docs.append(document({"list": value}))
        docs.append(document({"obj": value, "text": value}))
        docs.append(document({"cap": value, "s": "ab", "n": value}))
    docs.append(
        document({"n": 1, "s": "x", "list": [1], "obj": {}}, groups=("admins", "adm-x"), depth=9, calls=50, repeats=2)
    )
    return docs


@pytest.fixture(scope="module", params=list(BUNDLES))
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[tuple[EmbeddedEngine, OpaServerEngine]]:
    bundle = PolicyBundle.from_directory(BUNDLES[request.param])
    with run_opa() as opa:
        embedded, server = EmbeddedEngine(bundle), OpaServerEngine(opa.url, bundle=bundle)
        yield embedded, server
        await embedded.close()
        await server.close()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def same(decision: Decision) -> tuple[bool, tuple[str, ...], dict[str, Any]]:
    return decision.allow, decision.reasons, dict(decision.obligations)


DIVERGENCES = json.loads((Path(__file__).parent / "engine_divergences.json").read_text())["divergences"]


async def assert_agree(engines: tuple[EmbeddedEngine, OpaServerEngine], doc: dict[str, Any]) -> None:
    embedded, opa = engines
    mine, reference = await embedded.decide(doc), await opa.decide(doc)
    assert same(mine) == same(reference), f"engines disagree on {doc['arguments']!r}"


async def test_hand_written_and_adversarial_inputs(
    engines: tuple[EmbeddedEngine, OpaServerEngine], request: pytest.FixtureRequest
) -> None:
    """Every input agrees, except the documented divergences, which must differ exactly as documented."""
    docs = hand_written() + [document(d["arguments"]) for d in DIVERGENCES]
    assert len(docs) >= 250
    embedded, opa = engines
    documented = {json.dumps(d["arguments"], sort_keys=True): d for d in DIVERGENCES}
    adversarial = "adversarial" in request.node.callspec.id
    seen: set[str] = set()
    for doc in docs:
        mine, reference = await embedded.decide(doc), await opa.decide(doc)
        key = json.dumps(doc["arguments"], sort_keys=True)
        entry = documented.get(key) if adversarial else None
        if entry is None:
            assert same(mine) == same(reference), f"engines disagree on {doc['arguments']!r}"
            continue
        seen.add(key)
        assert sorted(set(mine.reasons) - set(reference.reasons)) == entry["embedded_only"], key
        assert sorted(set(reference.reasons) - set(mine.reasons)) == entry["opa_only"], key
    if adversarial:
        assert seen == set(documented), "a documented divergence was not exercised"


def _agrees_by_construction(value: Any) -> bool:
    """Outside the documented divergence classes: numbers print the same in both engines, and any
    string that looks numeric is a strict JSON number (so to_number parses it the same way)."""
    if isinstance(value, float):
        return value == 0 or 1e-3 <= abs(value) < 1e5
    if isinstance(value, str):
        if not all(c == " " or unicodedata.category(c)[0] in "LMNPS" for c in value):
            return False  # string-escape class: non-printable characters
        if re.search(r"(?i)inf|nan", value) or any(c.isdigit() for c in value):
            return bool(_JSON_NUMBER.fullmatch(value)) or not re.search(r"\d", value)
        return True
    if isinstance(value, dict):
        return all(_agrees_by_construction(k) and _agrees_by_construction(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_agrees_by_construction(v) for v in value)
    return True


_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    # Below 2e6: the adversarial policy halves numbers, and a non-integer ≥ 1e6 is in the documented
    # number-format class (pinned by hand-written entries, e.g. 2**53 - 1).
    st.integers(min_value=-1_999_999, max_value=1_999_999),
    st.floats(allow_nan=False, allow_infinity=False, width=64).filter(lambda f: not math.isnan(f)),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
arguments = st.dictionaries(
    st.sampled_from(["n", "s", "list", "obj", "cap", "text", "customer_id", "password"]), json_values, max_size=5
).filter(_agrees_by_construction)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    args=arguments,
    tool_index=st.integers(0, 2),
    groups=st.lists(st.sampled_from(["analysts", "admins", "adm", "ops", "Ädmins", ""]), max_size=3).map(tuple),
    depth=st.integers(0, 12),
    calls=st.integers(0, 60),
    repeats=st.integers(0, 6),
    used=st.integers(0, 2000),
    limit=st.integers(0, 2000),
    action=st.sampled_from(["call", "list"]),
)
async def test_generated_inputs(
    engines: tuple[EmbeddedEngine, OpaServerEngine],
    args: dict[str, Any],
    tool_index: int,
    groups: tuple[str, ...],
    depth: int,
    calls: int,
    repeats: int,
    used: int,
    limit: int,
    action: str,
) -> None:
    await assert_agree(engines, document(args, tool_index, groups, depth, calls, repeats, used, limit, action))
