"""Redaction before anything is written: one `Redactor` for every sink (the audit outbox, the logs,
the decision log, the traces built from the outbox, exports)."""

from __future__ import annotations

import functools
import importlib
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
_CLEAN_ENTRIES = 16_384


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


# One search over a value's texts joined by newlines stands for one search per text only where a match
# in a text is a match in the joined text too. RE2's gate: with `^` and `$` made line anchors (`(?m)`),
# each text sits between line boundaries as it sat between the ends of the text, and a newline is no
# word character (`\b`, `\B` hold alike); only `\A`, `\z` and a flag turned off (`(?-m)`) would see
# the difference: a gate with one of them is not joined.
_JOINT_UNSAFE = re.compile(r"\\[Az]|\(\?[A-Za-z]*-")
_UNANCHORED = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)


def _match_of(regexp: Any) -> Any:
    """RE2's own `Match(anchor, data, pos, endpos)` of a compiled `regexp`, spans with (-1, -1) first
    when there is no match (the wrapper's `search` builds a generator and a match object: ~0.3 us a
    search); the wrapper's `search` in that shape where a google-re2 has no such thing."""
    match = getattr(getattr(regexp, "_regexp", None), "Match", None)
    if match is not None and _UNANCHORED is not None:
        return match
    return lambda _anchor, data, pos, endpos: [(-1, -1) if regexp.search(data, pos, endpos) is None else (pos, pos)]


def _joinable(rule: _Rule) -> bool:
    """A rule RE2 cannot express may still be searched once over the joined texts: when its pattern is
    made of characters, classes, groups, alternatives, repeats and word boundaries (a match of it
    depends on nothing but the text it spans, and the word character or none either side). Lookarounds,
    anchors, atomic groups, possessive repeats, back-references and conditionals are not."""
    try:
        parser: Any = importlib.import_module("re._parser")
        constants: Any = importlib.import_module("re._constants")
        tree = parser.parse(rule.pattern.pattern, rule.pattern.flags)
    except Exception:  # a parser that is not the one this knows: join nothing
        return False
    plain = {constants.LITERAL, constants.NOT_LITERAL, constants.ANY, constants.IN}
    boundaries = {constants.AT_BOUNDARY, constants.AT_NON_BOUNDARY}

    def safe(items: Iterable[tuple[Any, Any]]) -> bool:
        for op, arg in items:
            if op in plain or (op is constants.AT and arg in boundaries):
                continue
            if op is constants.BRANCH:
                if not all(safe(branch) for branch in arg[1]):
                    return False
            elif op is constants.SUBPATTERN:
                if not safe(arg[3]):
                    return False
            elif op is constants.MAX_REPEAT or op is constants.MIN_REPEAT:
                if not safe(arg[2]):
                    return False
            else:
                return False
        return True

    return bool(safe(tree))


def _literal_prefix(rule: _Rule) -> tuple[str, bool]:
    """The text every match of `rule` starts with, and whether it is to be found case-insensitively
    (then in ASCII only, where folding case is lowering it): ("", False) when there is none."""
    try:
        parser: Any = importlib.import_module("re._parser")
        constants: Any = importlib.import_module("re._constants")
        tree = parser.parse(rule.pattern.pattern, rule.pattern.flags)
    except Exception:
        return "", False
    chars: list[str] = []
    for op, arg in tree:
        if op is not constants.LITERAL:
            break
        chars.append(chr(arg))
    literal = "".join(chars)
    folded = bool(tree.state.flags & re.IGNORECASE)
    if folded and not literal.isascii():
        return "", False
    return (literal.lower() if folded else literal), folded


class SecretScanner:
    """Finds secrets in text: detect-secrets' detectors, the gateway's own rules, configured patterns.

    One RE2 pass over a pattern that matches wherever any rule can gates the rules themselves, so
    ASCII text with no candidate costs microseconds (rules that RE2 cannot express, and non-ASCII
    text, where RE2's character classes are narrower than Python's, always take the full scan). The
    texts of a value are gated at once, joined (`suspects`, for `Redactor.apply`).
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
        self._gate_match = _match_of(self._gate) if self._gate is not None else None
        # The texts of a value searched at once (`suspects`): the gate with line anchors, and the rules it
        # leaves out each with the literal its matches start with (a substring test first).
        joint_gate: Any = None
        self._joint = all(_joinable(rule) for rule in always) and not any(_JOINT_UNSAFE.search(g) for g in gated)
        if self._joint and gated:
            joint_gate = _match_of(re2.compile("(?m:" + "|".join(gated) + ")", options))
        self._joint_gate = joint_gate
        self._always_prefixed = tuple((rule, *_literal_prefix(rule)) for rule in always)
        self._clean: set[str] = set()
        """Texts `suspects` cleared (redacted, each is itself): a value's walk skips them."""
        self._dirty: set[str] = set()
        """Texts with a secret in them, found redacting a value's: its walk redacts them alone at once
        (then they do not set the joined search off for the others). Only a way: any text may be in it."""
        # Names, tool names, groups and reasons repeat from call to call: short texts are remembered,
        # and so are their spans (the guardrails scan a call's arguments, then the audit redacts them).
        self._short = functools.lru_cache(maxsize=_CACHE_ENTRIES)(self._redact)
        self._short_spans = functools.lru_cache(maxsize=_CACHE_ENTRIES)(self._spans)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where the secrets in `text` are, widened to whole tokens, merged, in order."""
        return list(self._short_spans(text) if len(text) <= _CACHE_CHARS else self._spans(text))

    def _spans(self, text: str) -> tuple[tuple[int, int], ...]:
        # ASCII text searched as its bytes: the same match, without the wrapper mapping str offsets
        gate = self._gate_match
        rules: Iterable[_Rule]
        if text.isascii() and gate is not None and gate(_UNANCHORED, data := text.encode(), 0, len(data))[0][0] < 0:
            rules = self._unexpressed_candidates(text)
            if not rules:
                return ()
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

    def _unexpressed_candidates(self, text: str) -> list[_Rule]:
        """The rules RE2 cannot take whose matches' leading literal is in `text` (the others cannot match it)."""
        rules: list[_Rule] = []
        lowered = None
        for rule, literal, folded in self._always_prefixed:
            if folded:
                lowered = text.lower() if lowered is None else lowered
                if literal not in lowered:
                    continue
            elif literal not in text:
                continue
            rules.append(rule)
        return rules

    def redact(self, text: str) -> str:
        """`text` with each secret in it replaced by `[REDACTED]`."""
        return self._short(text) if len(text) <= _CACHE_CHARS else self._redact(text)

    def suspects(self, texts: list[str]) -> list[int]:
        """Which of `texts` may hold a secret (their places in `texts`): none when one search over them
        all finds nothing (then `redact` of each is itself, and they are remembered as clean); every one
        when it finds something; the non-ASCII ones (the gate is for ASCII text) when the rest are clean."""
        if not self._joint:
            return list(range(len(texts)))
        joined = "\n".join(texts)
        if joined.isascii():
            return [] if self._clean_joined(joined, texts) else list(range(len(texts)))
        ascii_texts = [text for text in texts if text.isascii()]
        if ascii_texts and not self._clean_joined("\n".join(ascii_texts), ascii_texts):
            return list(range(len(texts)))
        return [i for i, text in enumerate(texts) if not text.isascii()]

    def _clean_joined(self, joined: str, texts: list[str]) -> bool:
        gate = self._joint_gate
        if gate is not None and gate(_UNANCHORED, data := joined.encode(), 0, len(data))[0][0] >= 0:
            return False
        for rule in self._unexpressed_candidates(joined):
            if rule.pattern.search(joined) is not None:
                return False
        known = self._clean
        if len(known) >= _CLEAN_ENTRIES:  # texts a caller chooses must not grow it without bound
            known.clear()
        if len(joined) <= _CACHE_CHARS:
            known.update(texts)
        else:
            known.update(text for text in texts if len(text) <= _CACHE_CHARS)
        return True

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
        self._kinds: dict[str, int] = {}
        self._clones: dict[frozenset[str], Redactor] = {}
        self._kept: dict[int, tuple[object, Any, Any]] = {}

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
            clone._kinds = {}
            clone._clones = {}
            clone._kept = {}
            if len(self._clones) >= _CLONES:
                self._clones.clear()
            self._clones[more] = clone
        return clone

    def keep(self, owner: object, value: Any, redacted: Any) -> None:
        """Remember that this redactor made `redacted` of `value` for `owner` (a decision): another sink
        that writes the same value for the same owner takes it with `kept` instead of redacting it again
        (the decision log and the audit record both write a call's decision input). Bounded: the
        oldest is forgotten first."""
        kept = self._kept
        if len(kept) >= _KEPT:
            del kept[next(iter(kept))]
        kept[id(owner)] = (owner, value, redacted)  # the owner is held: its id names no other object

    def kept(self, owner: object, value: Any) -> Any | None:
        """What `keep` remembered for `owner`, when it was of a value equal to `value`, else None; once.
        Equal values redact alike: the redaction of a value depends on nothing but the value."""
        found = self._kept.pop(id(owner), None)
        if found is None or found[0] is not owner or found[1] != value:
            return None
        return found[2]

    def text(self, value: str) -> str:
        """`value` with every secret found in it replaced."""
        return self._scanner.redact(value)

    def apply(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            return self._scanner.redact(value)
        if kind is dict or kind is list or kind is tuple:
            # The gated walk (below); where it stops, the plain one. As deep a value as one stops, the
            # other does: the same frames, one a container, so a RecursionError is the walk's own.
            noted: list[tuple[Any, Any, str]] = []
            try:
                out = self._gated_mapping(value, noted) if kind is dict else self._gated_sequence(value, noted)
            except (_Walk, RecursionError):
                return self._mapping(value) if kind is dict else self._sequence(value)
            if noted:
                suspects = self._scanner.suspects([text for _, _, text in noted])
                if suspects:
                    scanner = self._scanner
                    redact, clean, dirty = scanner.redact, scanner._clean, scanner._dirty
                    for i in suspects:
                        container, place, text = noted[i]
                        container[place] = redacted = redact(text)
                        if len(text) > _CACHE_CHARS:
                            continue
                        if redacted != text:
                            if len(dirty) >= _CLEAN_ENTRIES:
                                dirty.clear()
                            dirty.add(text)
                        elif len(clean) < _CLEAN_ENTRIES:
                            clean.add(text)  # itself: no secret in it (a redacted text never is)
            return out
        return self._apply(value)

    def _apply(self, value: Any) -> Any:
        """`apply` as the plain walk does it (its containers' members that are not plain)."""
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

    # `_mapping` and `_sequence` (the plain walk) are `_apply` unrolled one level for what records are
    # made of (strings, numbers, dicts and lists of them): one Python frame per container instead of one
    # per member, and a short string's redaction looked up in the scanner's cache without a call in
    # between. Same outcome as `_apply` member by member (a test holds them to a plain walk).

    def _mapping(self, value: Mapping[Any, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        keys, redact, short = self._keys, self._scanner.redact, self._scanner._short
        for key, member in value.items():
            if not isinstance(key, str):
                out[key] = self._apply(member)
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
                out[redacted_key] = self._apply(member)
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
                append(self._apply(member))
        return out

    # The gated walk (`apply` of a dict, list or tuple) is the plain walk with the texts' redaction put
    # off: a text the scanner has found clean before is kept as it is, one it found a secret in before is
    # redacted at once (as the plain walk does every text), the others are kept as they are and noted
    # with where they went, and one search over them all (`SecretScanner.suspects`) then says they are
    # all clean; else each noted text it cannot clear is redacted where it went, as the plain walk
    # would have. Where a place could be written twice (a key that redaction changes, into another
    # key's name) or the walk would go where no note can follow (a mapping not a dict, a key a `str`
    # subclass), it stops (`_Walk`): the plain walk does the value instead.

    def _gated_mapping(self, value: dict[Any, Any], noted: list[tuple[Any, Any, str]]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        kinds, note = self._kinds, noted.append
        scanner = self._scanner
        clean, dirty, redact = scanner._clean, scanner._dirty, scanner.redact
        for key, member in value.items():
            if type(key) is str:
                try:
                    kind = kinds[key]
                except KeyError:
                    kind = self._kind(key)
            elif isinstance(key, str):
                raise _Walk
            elif type(member) is str:  # a key not a name: the member as `apply` has it
                if member in clean:
                    out[key] = member
                elif member in dirty:
                    out[key] = redact(member)
                else:
                    out[key] = member
                    note((out, key, member))
                continue
            else:
                out[key] = self._gated_any(member, noted)
                continue
            kind_of_member = type(member)
            if kind_of_member is str:
                if kind and (kind == _NAMED or _high_entropy(member)):  # named, or secret-looking (_PLAIN is 0)
                    out[key] = REDACTED
                elif member in clean:
                    out[key] = member
                elif member in dirty:
                    out[key] = redact(member)
                else:
                    out[key] = member
                    note((out, key, member))
            elif kind == _NAMED:
                out[key] = REDACTED
            elif member is None or kind_of_member is int or kind_of_member is float or kind_of_member is bool:
                out[key] = member
            elif kind_of_member is dict:
                out[key] = self._gated_mapping(member, noted)
            elif kind_of_member is list or kind_of_member is tuple:
                out[key] = self._gated_sequence(member, noted)
            elif kind == _SECRET_LOOKING and isinstance(member, str) and _high_entropy(member):
                out[key] = REDACTED
            else:
                out[key] = self._gated_any(member, noted)
        return out

    def _gated_sequence(self, value: Iterable[Any], noted: list[tuple[Any, Any, str]]) -> list[Any]:
        out: list[Any] = []
        append, note = out.append, noted.append
        scanner = self._scanner
        clean, dirty, redact = scanner._clean, scanner._dirty, scanner.redact
        for member in value:
            kind = type(member)
            if kind is str:
                if member in clean:
                    append(member)
                elif member in dirty:
                    append(redact(member))
                else:
                    note((out, len(out), member))
                    append(member)
            elif member is None or kind is int or kind is float or kind is bool:
                append(member)
            elif kind is dict:
                append(self._gated_mapping(member, noted))
            else:
                append(self._gated_any(member, noted))
        return out

    def _gated_any(self, value: Any, noted: list[tuple[Any, Any, str]]) -> Any:
        """`apply` of a member that is not a `str` (those are noted by their container)."""
        kind = type(value)
        if kind is dict:
            return self._gated_mapping(value, noted)
        if kind is list or kind is tuple:
            return self._gated_sequence(value, noted)
        if value is None or kind is int or kind is float or kind is bool:
            return value
        if isinstance(value, str):
            return self._scanner.redact(value)
        if isinstance(value, Mapping):
            raise _Walk
        if isinstance(value, list | tuple):
            return self._gated_sequence(value, noted)
        return value

    def _kind(self, key: str) -> int:
        """What the name `key` says of its value, for a key that redaction keeps as it is (remembered);
        a key it changes stops the gated walk."""
        redacted_key, kind = self._keys.get(key) or self._key(key)
        if redacted_key != key:
            raise _Walk
        if len(self._kinds) >= _KEY_ENTRIES:
            self._kinds.clear()
        self._kinds[key] = kind
        return kind

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


class _Walk(Exception):
    """A value the gated walk leaves to the plain one."""


_PLAIN, _NAMED, _SECRET_LOOKING = 0, 1, 2
"""What a member's name says: nothing; it is a configured field (always redacted); it looks secret
(its high-entropy string value is redacted)."""
_KEY_ENTRIES = 4096
_CLONES = 256
_KEPT = 256
