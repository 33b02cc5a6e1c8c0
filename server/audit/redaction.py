"""Redaction before anything is stored: named fields and secret-looking text in audit records."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"


class Redactor:
    """Replaces the value of any object member whose name is in `fields` (case-insensitive, at any
    depth) and any text matching one of `patterns`, in place of the secret, with `[REDACTED]`."""

    def __init__(self, fields: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self._fields = frozenset(f.lower() for f in fields)
        joined = "|".join(f"(?:{p})" for p in patterns)
        self._pattern = re.compile(joined) if joined else None

    def with_fields(self, extra: Iterable[str]) -> Redactor:
        """This redactor plus more field names (e.g. a decision's `redact_fields` obligation)."""
        extra = [f for f in extra if f.lower() not in self._fields]
        if not extra:
            return self
        clone = Redactor.__new__(Redactor)
        clone._fields = self._fields | {f.lower() for f in extra}
        clone._pattern = self._pattern
        return clone

    def apply(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(REDACTED, value) if self._pattern is not None else value
        if isinstance(value, Mapping):
            return {
                k: REDACTED if isinstance(k, str) and k.lower() in self._fields else self.apply(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.apply(v) for v in value]
        return value
