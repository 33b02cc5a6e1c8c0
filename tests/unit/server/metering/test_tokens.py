"""Token counts: what tiktoken says for the text (or the compact JSON of a value), remembered or not."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from server.metering import tokens
from server.metering.tokens import TokenCounter

COUNTER = TokenCounter()
ENCODING = tokens.load_encoding("cl100k_base")


def exact(text: str) -> int:
    return len(ENCODING.encode_ordinary(text))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=1_500), min_size=1, max_size=6))
def test_a_count_is_the_encodings_whether_remembered_or_not(texts: list[str]) -> None:
    for text in texts + texts:  # each twice: the second is answered from memory when short
        assert COUNTER.count(text) == exact(text)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=20),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=50), st.lists, max_leaves=8),
        max_size=6,
    )
)
def test_a_value_counts_as_its_compact_json(value: dict[str, object]) -> None:
    assert COUNTER.count(value) == exact(json.dumps(value, separators=(",", ":"), default=str))
    assert COUNTER.count(value) == exact(json.dumps(value, separators=(",", ":"), default=str))
