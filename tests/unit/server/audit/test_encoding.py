from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from server.audit.encoding import encoder

COMPACT = (",", ":")
encode = encoder(separators=COMPACT)

finite_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _refuse(token: str) -> Any:
    raise ValueError(f"not JSON: {token}")


@given(finite_json)
def test_a_value_without_non_finite_numbers_gets_json_dumps_bytes(value: Any) -> None:
    assert encode(value) == json.dumps(value, separators=COMPACT, default=str)


@given(any_json)
def test_any_value_is_written_as_standard_json_with_non_finite_numbers_named(value: Any) -> None:
    text = encode(value)
    parsed = json.loads(text, parse_constant=_refuse)  # no NaN/Infinity token
    with sqlite3.connect(":memory:") as conn:
        assert conn.execute("SELECT json_valid(?)", (text,)).fetchone() == (1,)

    def expected(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"
        if isinstance(v, dict):
            return {k: expected(x) for k, x in v.items()}
        if isinstance(v, list):
            return [expected(x) for x in v]
        return v

    assert parsed == expected(value)


def test_other_values_are_their_str_and_tuples_lists_as_before() -> None:
    from datetime import UTC, datetime

    value = {"at": datetime(2026, 1, 2, tzinfo=UTC), "t": (1, float("nan")), 2.5: float("-inf")}
    assert json.loads(encode(value)) == {"at": "2026-01-02 00:00:00+00:00", "t": [1, "NaN"], "2.5": "-Infinity"}
