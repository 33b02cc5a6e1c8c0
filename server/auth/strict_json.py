"""Token JSON read strictly: one reading of a JWT's header and payload that every other reader shares.

JSON (RFC 8259 §4) leaves duplicated member names to the parser: Python keeps the last, other
libraries the first or refuse. A token with `"aud"` twice (or `"alg"`, `"exp"`, `"groups"`) would then
mean one thing to the gateway and another to an audit tool or an upstream that reads the same token.
RFC 7515 §5.2 and RFC 7519 §7.2 say to reject it, or use the last member only if the parser keeps the
last; we reject it, at every depth, before trusting anything in the token. For the same reason the
other things I-JSON (RFC 7493) rules out are refused: NaN and Infinity (not JSON, but Python takes
them), numbers that overflow a double (`1e400` is infinity to Python: an `exp` that never comes) or
an int64, and strings with unpaired surrogates (which other readers replace with U+FFFD).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

_BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class AmbiguousJson(ValueError):
    """A JSON text that readers may legitimately read differently (a duplicated member, NaN)."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise AmbiguousJson(f"duplicated member {name!r}")
        members[name] = value
    return members


def _no_constant(name: str) -> Any:
    raise AmbiguousJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise AmbiguousJson(f"number {text[:20]} overflows")
    return value


def _int64(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -(2**63) <= (value := int(text)) < 2**63:
        raise AmbiguousJson(f"number {text[:20]} is out of range")
    return value


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AmbiguousJson("string with an unpaired surrogate") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def loads_strict(text: str | bytes) -> Any:
    """`json.loads`, but a member name repeated in any object, NaN/Infinity, a number out of range or
    an unpaired surrogate raises `AmbiguousJson`. Other malformed JSON raises `ValueError` as usual."""
    value = json.loads(
        text,
        object_pairs_hook=_unique_members,
        parse_constant=_no_constant,
        parse_float=_finite_float,
        parse_int=_int64,
    )
    _check_strings(value)
    return value


def b64url_decode(segment: str) -> bytes:
    """One base64url segment of a compact JWS (no padding, RFC 7515 §2); anything else raises ValueError."""
    if not set(segment) <= _BASE64URL or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def compact_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload objects of a compact JWS, each read by `loads_strict`.

    Raises `AmbiguousJson` (naming the part) for a duplicated member, `ValueError` for anything that is
    not three base64url segments holding two JSON objects."""
    segments = token.split(".")
    if len(segments) != 3:
        raise ValueError("a compact JWT has three segments")
    parts: list[dict[str, Any]] = []
    for label, segment in (("header", segments[0]), ("payload", segments[1])):
        try:
            value = loads_strict(b64url_decode(segment).decode("utf-8"))  # RFC 7515: UTF-8, nothing else
        except AmbiguousJson as exc:
            raise AmbiguousJson(f"token {label} has a {exc}") from None
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"token {label} is not base64url JSON") from None
        if not isinstance(value, dict):
            raise ValueError(f"token {label} is not a JSON object")
        parts.append(value)
    return parts[0], parts[1]
