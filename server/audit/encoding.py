"""Standard JSON for what the gateway writes down (audit records, decision-log lines): never the
`NaN`, `Infinity` or `-Infinity` that Python's encoder writes by default.

Those tokens are not JSON. A caller can send them (Python's parser accepts them), and an upstream's
result can hold them; an audit record holding one is "malformed JSON" to SQLite's JSON functions, and
every query of the outbox that reads records through them (what is ready to ship, the backlog, the
audit search) then fails for the whole store. A non-finite number is written as its name, a string
("NaN", "Infinity", "-Infinity"); every other value gives the same bytes as `json.dumps` with the
same options."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any


def encoder(separators: tuple[str, str] | None = None) -> Callable[[Any], str]:
    """`json.dumps(value, separators=separators, default=str)` as one encoder made once, except that a
    non-finite float is written as a string (see the module docstring)."""
    strict = json.JSONEncoder(separators=separators, default=str, allow_nan=False).encode

    def encode(value: Any) -> str:
        try:
            return strict(value)
        except ValueError:  # a non-finite float somewhere (or a cycle, which raises again below)
            return strict(finite(value))

    return encode


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
