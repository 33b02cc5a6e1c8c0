from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from server.audit.chain import record_hash
from server.audit.encoding import decode, encode, encode_bytes

COMPACT = (",", ":")

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
def test_a_value_without_non_finite_numbers_reads_back_as_what_json_dumps_writes(value: Any) -> None:
    # orjson's text, not json.dumps's bytes (UTF-8, `0.00001` for `1e-05`): the same JSON value
    text = encode(value)
    assert json.loads(text) == json.loads(json.dumps(value, separators=COMPACT, default=str)) == decode(text)
    assert encode_bytes(value) == text.encode()


def test_non_ascii_text_is_written_as_utf8_and_reads_back() -> None:
    value = {"name": "café ☕", "line": "\u2028"}
    assert encode_bytes(value) == '{"name":"café ☕","line":"\u2028"}'.encode()
    assert decode(encode_bytes(value)) == value


def test_what_orjson_refuses_is_written_by_pythons_encoder() -> None:
    assert encode({"big": 2**70}) == '{"big":1180591620717411303424}'
    assert encode({"s": "\ud800"}) == '{"s":"\\ud800"}'  # a lone surrogate, escaped as before
    assert json.loads(encode({1: "a"})) == {"1": "a"}


def test_a_record_written_before_reads_with_its_nan_token() -> None:
    assert decode('{"n":NaN}')["n"] != decode('{"n":NaN}')["n"]  # a NaN, as Python's parser read it


def test_the_chain_hashes_utf8_text_as_its_stored_characters() -> None:
    text = encode({"name": "café"})
    assert record_hash("0" * 64, 1, "c", "decision", 1.5, text) == record_hash(
        "0" * 64, 1, "c", "decision", 1.5, json.loads(json.dumps(text))
    )


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
