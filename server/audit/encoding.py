"""Standard JSON for what the gateway writes down (audit records, decision-log lines): never the
`NaN`, `Infinity` or `-Infinity` that Python's encoder writes by default.

Those tokens are not JSON. A caller can send them (Python's parser accepts them), and an upstream's
result can hold them; an audit record holding one is "malformed JSON" to SQLite's JSON functions, and
every query of the outbox that reads records through them (what is ready to ship, the backlog, the
audit search) then fails for the whole store. A non-finite number is written as its name, a string
("NaN", "Infinity", "-Infinity").

Written by orjson (a 1.5 KB record: ~2 µs, where `json.dumps` takes ~35): compact, keys in insertion
order, UTF-8 (non-ASCII characters as themselves, not `\\u` escapes), a value JSON has no type for
as its `str` (as `default=str`). The text equals as JSON what `json.dumps(value, default=str)`
writes, not byte for byte (`1e-05` is `0.00001`, `café` is not escaped); the chain's MAC covers the
stored text, whatever its bytes (server/audit/chain.py), so records written before verify as they
did. orjson writes a non-finite float as `null`, so its text is read back (orjson, ~7 µs) and
compared with the value: a NaN or an infinity never equals the `null` it became. A value that does
not come back equal (a non-finite float; a tuple; a value written as its `str`), or that orjson
refuses (an integer beyond 64 bits, a lone surrogate, a key that is not a string, a cycle), is
written by Python's encoder as before: ASCII, compact, with non-finite floats named."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from server import json_exact

# A datetime or a dataclass goes to `default` (its `str`), as with json, not orjson's own form.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_strict = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def encode_bytes(value: Any) -> bytes:
    """`value` as compact standard JSON, UTF-8 (see the module docstring)."""
    try:
        text = orjson.dumps(value, default=str, option=_OPTIONS)
        if orjson.loads(text) == value:
            return text
    except (TypeError, ValueError, RecursionError):  # orjson.JSONEncodeError is a TypeError
        pass
    return _fallback(value).encode()


def encode(value: Any) -> str:
    """`encode_bytes(value)` as text."""
    return encode_bytes(value).decode()


def decode(text: str | bytes) -> Any:
    """A record or a line as written here (standard JSON) by orjson; one written before records were
    standard JSON (a `NaN` token, which orjson refuses), or holding an integer beyond 64 bits (which
    orjson would read as a float), by Python's parser, exactly as it was written (`server.json_exact`)."""
    return json_exact.loads(text)  # orjson where it reads exactly as json does (not integers past 64 bits)


def _fallback(value: Any) -> str:
    try:
        return _strict(value)
    except ValueError:  # a non-finite float somewhere (or a cycle, which raises again below)
        return _strict(finite(value))


def finite(value: Any) -> Any:
    """`value` with each non-finite float (at any depth, keys included) replaced by its name."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {finite(k) if isinstance(k, float) else k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
