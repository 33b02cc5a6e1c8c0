"""What a caller declares about its run (`_meta` and headers) is read strictly: any value, of any JSON
type, in any script, of any size, gives a well-formed run or is ignored and named; nothing raises."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.runs import MAX_DEPTH, run_info

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HUGE = 10**5000  # str() of it raises ValueError (Python's 4300-digit limit)
NOT_DEPTHS = ["\u00b2", "\u0663", "\uff13", "\U0001d7d1", "3\n", " 3", "+3", "-1", "1e3", "0x10", "3.5", "99999",
              HUGE, -HUGE, -1, 3.5, True, [3], {"d": 3}, float(MAX_DEPTH + 1), "\x00", "3" * 400]  # fmt: skip
NOT_RUN_IDS = [
    "run\n",
    "run 1",
    "rün",
    "\uff52\uff55\uff4e",
    "x" * 129,
    "",
    "a\x00b",
    "a\u200bb",
    7,
    ["r"],
    {"r": 1},
    None,
]
NOT_TRACEPARENTS = [TRACEPARENT + "\n", TRACEPARENT.upper(), "ff" + TRACEPARENT[2:], TRACEPARENT[:-1],
                    f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01",
                    TRACEPARENT + "-extra", 7, [TRACEPARENT], "\u0660\u0660" + TRACEPARENT[2:]]  # fmt: skip


DEPTH_CASES = [("meta", v) for v in NOT_DEPTHS] + [("header", v) for v in NOT_DEPTHS if isinstance(v, str)]


@pytest.mark.parametrize(
    ("where", "value"),
    DEPTH_CASES,
    ids=[f"{w}-{ascii(v)[:20] if v not in (HUGE, -HUGE) else 'huge'}" for w, v in DEPTH_CASES],
)
def test_a_depth_that_is_not_a_plain_integer_is_ignored_and_named(where: str, value: Any) -> None:
    meta, headers = ({"io.castellan/depth": value}, {}) if where == "meta" else ({}, {"x-castellan-run-depth": value})
    run = run_info(meta, headers, fallback="c")
    assert run.depth == 0
    assert len(run.ignored) == 1
    assert "not a depth" in run.ignored[0]


@pytest.mark.parametrize("value", NOT_RUN_IDS, ids=[ascii(v)[:20] for v in NOT_RUN_IDS])
def test_a_run_id_that_is_not_an_ascii_id_is_ignored(value: Any) -> None:
    run = run_info({"io.castellan/runId": value}, {}, fallback="call-1")
    assert run.run_id == "call-1"


@pytest.mark.parametrize("value", NOT_TRACEPARENTS, ids=[ascii(v)[:24] for v in NOT_TRACEPARENTS])
def test_a_malformed_traceparent_is_ignored(value: Any) -> None:
    run = run_info({"traceparent": value}, {}, fallback="c")
    assert (run.run_id, run.traceparent) == ("c", None)


def test_well_formed_values_are_still_read() -> None:
    run = run_info({"io.castellan/depth": 3.0, "traceparent": TRACEPARENT}, {"x-castellan-run-id": "r-1"}, "c")
    assert (run.run_id, run.depth, run.traceparent, run.ignored) == ("r-1", 3, TRACEPARENT, ())
    assert run_info({"depth": MAX_DEPTH}, {}, "c").depth == MAX_DEPTH


def test_a_malformed_meta_value_gives_way_to_a_good_header() -> None:
    run = run_info({"io.castellan/depth": "²"}, {"x-castellan-run-depth": "4"}, "c")
    assert run.depth == 4
    assert run.ignored == ("_meta io.castellan/depth: not a depth (an integer from 0 to 10000)",)


def test_a_header_sent_twice_is_used_neither_way() -> None:
    from starlette.datastructures import Headers

    headers = Headers(raw=[(b"x-castellan-run-depth", b"2"), (b"x-castellan-run-depth", b"9")])
    run = run_info({}, headers, "c")
    assert run.depth == 0
    assert run.ignored == ("header x-castellan-run-depth: sent more than once",)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.just(10**400) | st.floats() | st.text(max_size=200),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
meta_keys = st.sampled_from(["io.castellan/runId", "run_id", "io.castellan/depth", "depth", "traceparent"])
header_values = st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=200)
SANE_RUN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}", re.ASCII)


@given(
    meta=st.dictionaries(meta_keys | st.text(max_size=10), json_values, max_size=6) | json_values,
    headers=st.dictionaries(st.sampled_from(["x-castellan-run-id", "x-castellan-run-depth", "traceparent"]),
                            header_values | st.sampled_from(NOT_DEPTHS[:12]).map(str), max_size=3),
)  # fmt: skip
def test_any_declaration_gives_a_well_formed_run(meta: Any, headers: dict[str, str]) -> None:
    run = run_info(meta if isinstance(meta, dict) else None, headers, fallback="fallback")
    assert run.run_id == "fallback" or SANE_RUN.fullmatch(run.run_id)
    assert type(run.depth) is int
    assert 0 <= run.depth <= MAX_DEPTH
    assert run.traceparent is None or re.fullmatch(
        r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", run.traceparent
    )
