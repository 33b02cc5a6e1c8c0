"""JSON parsed fast and exactly: orjson, except where its reading would differ from the standard
library's.

orjson refuses what is not JSON (`NaN`, `Infinity`) and lone surrogate escapes, and it reads an
integer beyond 64 bits as a float (`100000000000000000000` becomes `1e+20`) without saying so. Python's
parser reads all of these exactly. So a text that orjson refuses, or that holds a run of 19 or more
digits (every integer of 2**63 or more has at least 19), is parsed by `json.loads`; any other text
gives the same value from both parsers, orjson's about 3x faster."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_DIGITS = re.compile(r"[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")


def loads(text: str | bytes | bytearray | memoryview) -> Any:
    """The value of the JSON `text`, as `json.loads` reads it (raises `ValueError` where it does)."""
    if isinstance(text, str):
        long_digits = _LONG_DIGITS.search(text) is not None
    else:
        text = bytes(text) if not isinstance(text, bytes) else text
        long_digits = _LONG_DIGITS_BYTES.search(text) is not None
    if not long_digits:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)
