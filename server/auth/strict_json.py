"""Token JSON read strictly: one reading of a JWT's header and payload that every other reader shares.

JSON (RFC 8259 §4) leaves duplicated member names to the parser: Python keeps the last, other
libraries the first or refuse. A token with `"aud"` twice (or `"alg"`, `"exp"`, `"groups"`) would then
mean one thing to the gateway and another to an audit tool or an upstream that reads the same token.
RFC 7515 §5.2 and RFC 7519 §7.2 say to reject it, or use the last member only if the parser keeps the
last; we reject it, at every depth, before trusting anything in the token. NaN and Infinity, which are
not JSON but Python accepts, are refused for the same reason.
"""

from __future__ import annotations

import base64
import binascii
import json
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


def loads_strict(text: str | bytes) -> Any:
    """`json.loads`, but a member name repeated in any object, or NaN/Infinity, raises `AmbiguousJson`.

    Other malformed JSON raises `ValueError` as usual."""
    return json.loads(text, object_pairs_hook=_unique_members, parse_constant=_no_constant)


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
