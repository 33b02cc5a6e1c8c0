"""`server.json_exact.loads` reads every JSON text as `json.loads` does: the same values, of the same
types (an integer beyond 64 bits stays an exact integer, not orjson's float)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.json_exact import loads

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: beyond 64 bits too
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and the infinities: json writes them as tokens
    | st.text()
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5), max_leaves=30
)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@given(_values, st.booleans(), st.booleans())
def test_reads_what_json_reads(value: Any, ascii_only: bool, as_bytes: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert _same(loads(text.encode("utf-8", "surrogatepass") if as_bytes and ascii_only else text), json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        '{"n": 100000000000000000000}',  # orjson alone reads 1e+20
        "[18446744073709551616, -9223372036854775809]",
        '{"ts": 1764662400000000000}',  # 19 digits within 64 bits: exact either way
        '{"x": NaN, "y": -Infinity}',
        '"\\ud800"',
    ],
)
def test_the_texts_orjson_alone_reads_differently(text: str) -> None:
    assert _same(loads(text), json.loads(text))
    assert _same(loads(text.encode()), json.loads(text))


def test_a_malformed_text_raises_json_decode_error_as_json_does() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads("{")
