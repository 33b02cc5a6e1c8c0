"""Redaction before anything is written: one `Redactor` for every sink (the audit outbox, the logs,
the decision log, the traces built from the outbox, exports)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import re2  # type: ignore[import-untyped]
from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.plugins import keyword as _keyword
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.ip_public import IPPublicDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector

if TYPE_CHECKING:
    from server.settings import AuditSettings

REDACTED = "[REDACTED]"

# What detect-secrets does not cover, in the shapes a gateway sees: HTTP credentials; assignments to
# its own keywords whose value starts with a symbol (its rules want a word character first, to keep
# code scanning quiet); and the `token`/`credential` family of names, which its keywords leave out
# (a value there needs a letter: `max_tokens: 100000` is no secret).
# Quotes may arrive escaped, once or many times over (`db_pass=\\'v\\'` in a repr'd reason, then JSON):
# backslashes before a quote belong to the quoting, never to the value.
_ASSIGNED = r"""[\w.\-]*(?:\\*["'\]]){0,2}\s*(?::=|=>|[:=])\s*(?:\\*["'`])?"""
_VALUE = r"""[^\s"'`,;&\\]"""
GATEWAY_RULES = (
    r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{8,}=*)",
    r"(?i)\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest|negotiate)\s+)?([^\s\"',;]{6,})",
    rf"(?i)(?<![A-Za-z0-9])[\w.\-]*(?:{'|'.join(_keyword.DENYLIST)}){_ASSIGNED}({_VALUE}{{4,}})",
    rf"(?i)(?<![A-Za-z0-9])[\w.\-]*(?:token|credential|session[_\-]?(?:id|key)|access[_\-]?key|auth[_\-]?(?:code|key|token)"
    rf"|passphrase|cookie){_ASSIGNED}((?={_VALUE}*[A-Za-z]){_VALUE}{{6,}})",
)

# A field whose name says it holds a secret has its high-entropy values redacted, whatever their shape.
_NAME_TERMS = ("token", "credential", "auth", "session", "cookie", "signature", "passphrase", r"(?:^|[_\-.])keys?$")
_SECRET_NAME = re.compile("|".join((*_keyword.DENYLIST, *_NAME_TERMS)), re.IGNORECASE)
_MIN_ENTROPY_CHARS = 12
_HEX = frozenset("0123456789abcdefABCDEF")
# detect-secrets' limit for hex strings; for other text a lower one than its 4.5 (tuned for any
# quoted string in source code), since the field's name already says "secret".
_HEX_ENTROPY, _TEXT_ENTROPY = 3.0, 3.5
_HEX_PLUGIN, _TEXT_PLUGIN = HexHighEntropyString(), Base64HighEntropyString()

# Characters a token is made of: a match is widened to the whole token it sits in, so a detector
# that recognises a prefix (`ghp`) or half a JWT still removes all of it.
_TOKEN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-.~")
_CACHE_ENTRIES, _CACHE_CHARS = 16_384, 256
_PEM_END = re.compile(r"-----END[^\n-]*-----|\Z")


@dataclass(frozen=True, slots=True)
class _Rule:
    pattern: re.Pattern[str]
    group: int
    private_key: bool = False


def _library_rules() -> list[_Rule]:
    """Every regex detector detect-secrets ships (public IPv4 addresses are not secrets), and its
    keyword-assignment rules for every syntax it knows (`key=value`, `key: value`, quoted, `:=`...)."""
    rules: list[_Rule] = []
    plugins: Mapping[str, type[BasePlugin]] = get_mapping_from_secret_type_to_class()
    for cls in plugins.values():
        if not issubclass(cls, RegexBasedDetector) or cls is IPPublicDetector:
            continue
        for pattern in cls().denylist:
            rules.append(_Rule(pattern, 1 if pattern.groups else 0, private_key=cls is PrivateKeyDetector))
    seen: set[str] = set()
    for table in (_keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, *_keyword.REGEX_BY_FILETYPE.values()):
        for pattern, group in table.items():
            if pattern.pattern not in seen:
                seen.add(pattern.pattern)
                rules.append(_Rule(pattern, group))
    return rules


_LOOKAROUND = re.compile(r"\(\?<?[=!](?:[^()\\]|\\.|\((?:[^()\\]|\\.)*\))*\)")
_BIG_REPEAT = re.compile(r"\{(\d+),\d{4,}\}")
_BACKREF = re.compile(r"\\[1-9]")


def _superset(rule: _Rule) -> str | None:
    """An RE2 pattern that matches wherever `rule` can (ASCII text): lookarounds dropped,
    back-references widened, huge repeat bounds opened. None when RE2 cannot take it."""
    pattern = rule.pattern
    if pattern.flags & re.VERBOSE:
        return None
    text = _BACKREF.sub("(?:.*?)", _BIG_REPEAT.sub(r"{\1,}", _LOOKAROUND.sub("", pattern.pattern)))
    inline = (("i", re.IGNORECASE), ("m", re.MULTILINE), ("s", re.DOTALL))
    flags = "".join(f for f, bit in inline if pattern.flags & bit)
    text = f"(?{flags}:{text})" if flags else f"(?:{text})"
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(text, options)
    except re2.error:
        return None
    return text


class SecretScanner:
    """Finds secrets in text: detect-secrets' detectors, the gateway's own rules, configured patterns.

    One RE2 pass over a pattern that matches wherever any rule can gates the rules themselves, so
    ASCII text with no candidate costs microseconds (rules that RE2 cannot express, and non-ASCII
    text, where RE2's character classes are narrower than Python's, always take the full scan).
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        rules = _library_rules()
        for source in (*GATEWAY_RULES, *patterns):
            compiled = re.compile(source)
            rules.append(_Rule(compiled, 1 if compiled.groups else 0))
        self._rules = tuple(rules)
        gated: list[str] = []
        always: list[_Rule] = []
        for rule in self._rules:
            superset = _superset(rule)
            if superset is None:
                always.append(rule)
            else:
                gated.append(superset)
        options = re2.Options()
        options.max_mem = 64 << 20
        options.never_capture = True  # the gate only says whether: no group spans to build per search
        self._gate = re2.compile("|".join(gated), options) if gated else None
        self._always = tuple(always)
        # Names, tool names, groups and reasons repeat from call to call: short texts are remembered,
        # and so are their spans (the guardrails scan a call's arguments, then the audit redacts them).
        self._short = functools.lru_cache(maxsize=_CACHE_ENTRIES)(self._redact)
        self._short_spans = functools.lru_cache(maxsize=_CACHE_ENTRIES)(self._spans)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where the secrets in `text` are, widened to whole tokens, merged, in order."""
        return list(self._short_spans(text) if len(text) <= _CACHE_CHARS else self._spans(text))

    def _spans(self, text: str) -> tuple[tuple[int, int], ...]:
        if text.isascii() and self._gate is not None and self._gate.search(text) is None:
            rules: Iterable[_Rule] = self._always
        else:
            rules = self._rules
        found: list[tuple[int, int]] = []
        for rule in rules:
            for match in rule.pattern.finditer(text):
                start, end = match.span(rule.group)
                if start < 0 or start == end:
                    continue
                if rule.private_key:
                    end = _PEM_END.search(text, end).end()  # type: ignore[union-attr]  # \Z always matches
                found.append(_widen(text, start, end))
        return tuple(_merge(found))

    def redact(self, text: str) -> str:
        """`text` with each secret in it replaced by `[REDACTED]`."""
        return self._short(text) if len(text) <= _CACHE_CHARS else self._redact(text)

    def _redact(self, text: str) -> str:
        spans = self._short_spans(text) if len(text) <= _CACHE_CHARS else self._spans(text)
        if not spans:
            return text
        parts: list[str] = []
        last = 0
        for start, end in spans:
            parts.append(text[last:start])
            parts.append(REDACTED)
            last = end
        parts.append(text[last:])
        return "".join(parts)


def _widen(text: str, start: int, end: int) -> tuple[int, int]:
    """The span trimmed of separators a detector matched around the secret, then grown to the
    whole token (`=` padding belongs to a token only at its end)."""
    while start < end and text[start] not in _TOKEN:
        start += 1
    while end > start and text[end - 1] not in _TOKEN and text[end - 1] != "=":
        end -= 1
    if start == end:
        return start, end
    while start > 0 and text[start - 1] in _TOKEN:
        start -= 1
    while end < len(text) and (text[end] in _TOKEN or text[end] == "="):
        end += 1
    return start, end


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[0] < s[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _high_entropy(value: str) -> bool:
    """Any whitespace-separated token of `value` looks random (detect-secrets' Shannon measure)."""
    for token in value.split():
        if len(token) >= _MIN_ENTROPY_CHARS:
            if _HEX.issuperset(token):
                if _HEX_PLUGIN.calculate_shannon_entropy(token) > _HEX_ENTROPY:
                    return True
            elif _TEXT_PLUGIN.calculate_shannon_entropy(token) > _TEXT_ENTROPY:
                return True
    return False


@functools.cache
def _scanner(patterns: tuple[str, ...]) -> SecretScanner:
    return SecretScanner(patterns)


class Redactor:
    """Replaces secrets with `[REDACTED]` in any JSON-like value (at any depth; keys included):

    - the whole value of a member whose name is in `fields` (case-insensitive);
    - the high-entropy string value of a member whose name looks secret (`db_password_2`, `x-api-token`);
    - every secret `SecretScanner` finds in a string (AWS keys, passwords in URLs, `key=value`
      secrets, bearer tokens, JWTs, private keys, vendor tokens, and `patterns`).

    Never raises on JSON-like input; values that are not strings, mappings or sequences pass unchanged.
    """

    def __init__(self, fields: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self._fields = frozenset(f.lower() for f in fields)
        self._scanner = _scanner(tuple(patterns))
        self._keys: dict[str, tuple[str, int]] = {}
        self._clones: dict[frozenset[str], Redactor] = {}

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> Redactor:
        return cls(settings.redact_fields, settings.redact_patterns)

    @property
    def scanner(self) -> SecretScanner:
        """The secret scanner this redactor uses (the guardrails detect secrets with the same rules)."""
        return self._scanner

    def with_fields(self, extra: Iterable[str]) -> Redactor:
        """This redactor plus more field names (e.g. a decision's `redact_fields` obligation)."""
        extra = [f for f in extra if f.lower() not in self._fields]
        if not extra:
            return self
        more = frozenset(f.lower() for f in extra)
        clone = self._clones.get(more)
        if clone is None:  # the same obligation, call after call: one clone, its key cache warm
            clone = Redactor.__new__(Redactor)
            clone._fields = self._fields | more
            clone._scanner = self._scanner
            clone._keys = {}
            clone._clones = {}
            if len(self._clones) >= _CLONES:
                self._clones.clear()
            self._clones[more] = clone
        return clone

    def text(self, value: str) -> str:
        """`value` with every secret found in it replaced."""
        return self._scanner.redact(value)

    def apply(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            return self._scanner.redact(value)
        if kind is dict:
            return self._mapping(value)
        if kind is list or kind is tuple:
            return self._sequence(value)
        if value is None or kind is int or kind is float or kind is bool:
            return value
        if isinstance(value, str):
            return self._scanner.redact(value)
        if isinstance(value, Mapping):
            return self._mapping(value)
        if isinstance(value, list | tuple):
            return self._sequence(value)
        return value

    # `_mapping` and `_sequence` are `apply` unrolled one level for what records are made of (strings,
    # numbers, dicts and lists of them): one Python frame per container instead of one per member, and
    # a short string's redaction looked up in the scanner's cache without a call in between. Same
    # outcome as `apply` member by member (a test holds them to a plain walk).

    def _mapping(self, value: Mapping[Any, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        keys, redact, short = self._keys, self._scanner.redact, self._scanner._short
        for key, member in value.items():
            if not isinstance(key, str):
                out[key] = self.apply(member)
                continue
            redacted_key, kind = keys.get(key) or self._key(key)
            kind_of_member = type(member)
            if kind == _NAMED:
                out[redacted_key] = REDACTED
            elif kind_of_member is str:
                if kind == _SECRET_LOOKING and _high_entropy(member):
                    out[redacted_key] = REDACTED
                else:
                    out[redacted_key] = short(member) if len(member) <= _CACHE_CHARS else redact(member)
            elif member is None or kind_of_member is int or kind_of_member is float or kind_of_member is bool:
                out[redacted_key] = member
            elif kind_of_member is dict:
                out[redacted_key] = self._mapping(member)
            elif kind_of_member is list or kind_of_member is tuple:
                out[redacted_key] = self._sequence(member)
            elif kind == _SECRET_LOOKING and isinstance(member, str) and _high_entropy(member):
                out[redacted_key] = REDACTED
            else:
                out[redacted_key] = self.apply(member)
        return out

    def _sequence(self, value: Iterable[Any]) -> list[Any]:
        out: list[Any] = []
        append, redact, short = out.append, self._scanner.redact, self._scanner._short
        for member in value:
            kind = type(member)
            if kind is str:
                append(short(member) if len(member) <= _CACHE_CHARS else redact(member))
            elif member is None or kind is int or kind is float or kind is bool:
                append(member)
            elif kind is dict:
                append(self._mapping(member))
            else:
                append(self.apply(member))
        return out

    def _key(self, key: str) -> tuple[str, int]:
        """The key redacted, and what its name says of its value (member names repeat: remembered)."""
        known = self._keys.get(key)
        if known is None:
            kind = _NAMED if key.lower() in self._fields else _SECRET_LOOKING if _SECRET_NAME.search(key) else _PLAIN
            known = (self._scanner.redact(key), kind)
            if len(self._keys) >= _KEY_ENTRIES:  # names a caller chooses must not grow it without bound
                self._keys.clear()
            self._keys[key] = known
        return known


_PLAIN, _NAMED, _SECRET_LOOKING = 0, 1, 2
"""What a member's name says: nothing; it is a configured field (always redacted); it looks secret
(its high-entropy string value is redacted)."""
_KEY_ENTRIES = 4096
_CLONES = 256
