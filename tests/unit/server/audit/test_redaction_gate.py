"""`Redactor.apply` gates a value's texts with one search over them all (`SecretScanner.suspects`): held
to the plain walk, text by text, for values with secrets spliced anywhere in them."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.audit.redaction import _CLEAN_ENTRIES, REDACTED, Redactor, SecretScanner, _joinable, _Rule
from server.settings import AuditSettings
from tests.unit.server.audit.test_redaction import ORDINARY, SECRETS, _plain_walk, _Text

_SETTINGS = AuditSettings()
# Patterns a deployment may add, in the shapes that make joining texts delicate: anchors, a lookbehind,
# word boundaries, one RE2 cannot take at all (a possessive repeat), one that spans a newline.
_EXTRA = [r"^corp-[0-9]{6}$", r"(?<![a-z])tok-[0-9]{5}", r"\bemp[0-9]{4}\b", r"(?m)^line-[0-9]{4}$", r"a\nb-[0-9]{3}"]
_UNJOINABLE = [r"ref-[0-9]++!", r"(?<=id:)zz[0-9]{4}"]

_ANCHORED = [
    "AKCp8abcdefghij1234",  # detect-secrets' Artifactory rule: ^ or a separator before, $ or one after
    "AP6abcdefgh12",
    "APBxyzxyzx9",
    "corp-123456",
    "emp1234",
    "line-1234",
    "tok-12345",
    "a\nb-123",
    "ref-123!",
    "id:zz1234",
    "https://hooks.slack.com/services/T0ABCDEF/B0ABCDEF/abcdefghijklmnop",
    "HTTPS://HOOKS.SLACK.COM/SERVICES/T0ABCDEF/B0ABCDEF/ABCDEFGH",  # the rule RE2 cannot take: ignoring case
    "Bearer abcdefghijklmnop123",
    "password=hunter2abc",
    "AKIAIOSFODNN7EXAMPLE",
    # Secrets only Python's Unicode classes see (RE2's `\s` is ASCII): why non-ASCII text is never joined.
    "Bearer\u2003abcdefghijklmnop123",
    "password\u00a0=\u00a0hunter2abc",
    "x bearer\u3000abcdefghijk",
]
_PARTS = sorted({part for s in SECRETS for part in s.parts})
_SECRET_TEXTS = [s.text for s in SECRETS] + _PARTS + _ANCHORED


def _redactors() -> list[Redactor]:
    base = Redactor.from_settings(_SETTINGS)
    return [
        base,
        base.with_fields(["email", "name"]),
        Redactor(_SETTINGS.redact_fields, [*_SETTINGS.redact_patterns, *_EXTRA]),
        Redactor(_SETTINGS.redact_fields, [*_SETTINGS.redact_patterns, *_EXTRA, *_UNJOINABLE]),
    ]


def _spliced(text: str, secret: str, at: int) -> str:
    at = at % (len(text) + 1)
    return text[:at] + secret + text[at:]


_NEAR = string.ascii_letters + string.digits + " \n\t=:\"'-_./"
_texts = st.one_of(
    st.sampled_from(_ANCHORED),
    st.sampled_from(_ANCHORED),
    st.sampled_from(_SECRET_TEXTS),
    st.sampled_from(ORDINARY),
    st.text(max_size=24),  # any character: non-ASCII, controls, newlines
    st.text(alphabet=_NEAR, max_size=24),
    st.builds(_spliced, st.text(alphabet=_NEAR, max_size=30), st.sampled_from(_SECRET_TEXTS), st.integers(0, 40)),
    st.builds(_spliced, st.text(max_size=12), st.sampled_from(_SECRET_TEXTS), st.integers(0, 20)),
    st.builds(lambda s, n: "x " * n + s, st.sampled_from(_SECRET_TEXTS + ORDINARY), st.integers(120, 200)),  # long
    st.builds(lambda s: s.upper(), st.sampled_from(_SECRET_TEXTS)),
    st.sampled_from(["", "\n", " ", "[REDACTED]", "x\n", "\nx", "é", "Schlüssel für café — 秘密"]),
)
_names = st.one_of(
    st.sampled_from(["password", "API_KEY", "Token", "email", "Name", "secret"]),  # configured fields
    st.sampled_from(["db_credential", "x-session-key", "auth_blob", "sort_key", "keys", "tokens_in", "session_id"]),
    st.sampled_from(["text", "call_id", "time", "reasons", "AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLF"]),
    _texts,
)
_random = st.builds(lambda n: __import__("secrets").token_urlsafe(n), st.integers(9, 30))  # high entropy
_secret_looking = st.sampled_from(["db_credential", "x-session-key", "auth_blob", "stripeApiToken", "sort_key"])


class _Frozen(Mapping[Any, Any]):
    """A mapping that is not a dict (a library's read-only view)."""

    def __init__(self, data: dict[Any, Any]) -> None:
        self._data = data

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class _Pairs(Mapping[Any, Any]):
    """A mapping whose items name one key more than once (nothing stops a Mapping doing so)."""

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: Any) -> Any:
        return dict(self._pairs)[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(dict(self._pairs))

    def __len__(self) -> int:
        return len(dict(self._pairs))

    def items(self) -> Any:
        return list(self._pairs)

    def __repr__(self) -> str:
        return f"_Pairs({self._pairs!r})"


class _Items(list[Any]):
    """A list subclass."""


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(2**64, 2**80), st.floats(),
    _texts, _texts, _texts, _random, _texts.map(_Text),
    st.just(b"bytes"), st.just(frozenset({"password=hunter2abc"})),
)  # fmt: skip
_keys = st.one_of(_names, _names, _names.map(_Text), st.integers(-3, 3), st.none(), st.just((1, "password")))
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, max_size=4).map(tuple),
        st.lists(inner, max_size=3).map(_Items),
        st.dictionaries(_keys, inner, max_size=7),
        st.dictionaries(_secret_looking, st.one_of(_random, _random.map(_Text), inner), max_size=3),
        st.dictionaries(_keys, inner, max_size=3).map(_Frozen),
        st.lists(st.tuples(st.sampled_from(["a", "b", 1]), inner), max_size=4).map(_Pairs),
    ),
    max_leaves=40,
)


# Values a secret hides in: mostly clean texts (what records hold) and one secret put in one of them,
# so that no other text sets the joined search off and it alone has to find the secret.
_clean_texts = st.one_of(
    st.sampled_from([*ORDINARY, "call 1", "01a237dd4e727e25ad274d285cb1a8c6", "2026-12-02T17:46:20.150118Z", "req-7"]),
    st.text(alphabet=string.ascii_letters + string.digits + " -_:./\n", max_size=20),
    st.text(max_size=8),
)
_clean_keys = st.one_of(
    st.sampled_from(["text", "call_id", "reasons", "name", "tokens_in", "session_id", "password", "db_credential"]),
    _clean_texts,
    st.integers(-2, 2),
)
_clean_values = st.recursive(
    st.one_of(st.none(), st.integers(), st.floats(), _clean_texts, _clean_texts, _clean_texts, _random),
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(_clean_keys, inner, max_size=7),
    ),
    max_leaves=30,
)


def _with_one_secret(value: object, secret: str, n: int) -> object:
    """`value` with one of its member texts (the n-th, counting round) replaced by `secret`, or with
    `secret` spliced into it."""
    places = sum(1 for _ in _member_texts(value))
    if not places:
        return [value, secret]
    target, seen = n % places, 0

    def put(member: object) -> object:
        nonlocal seen
        if isinstance(member, str):
            seen += 1
            if seen - 1 != target:
                return member
            return secret if n % 3 == 0 else _spliced(member, secret, n // 3)
        if isinstance(member, dict):
            return {k: put(v) for k, v in member.items()}
        if isinstance(member, list | tuple):
            return type(member)(put(v) for v in member)
        return member

    return put(value)


def _member_texts(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for member in value.values():
            yield from _member_texts(member)
    elif isinstance(value, list | tuple):
        for member in value:
            yield from _member_texts(member)


_one_secret = st.builds(
    _with_one_secret,
    _clean_values,
    st.one_of(st.sampled_from(_ANCHORED), st.sampled_from(_SECRET_TEXTS)),
    st.integers(0, 10_000),
)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, member in value.items():
            yield from _strings(key)
            yield from _strings(member)
    elif isinstance(value, list | tuple):
        for member in value:
            yield from _strings(member)


@pytest.mark.parametrize("which", range(4), ids=["configured", "obligation-fields", "patterns", "unjoinable"])
def test_the_gated_walk_redacts_as_the_plain_walk_does(which: int) -> None:
    redactor = _redactors()[which]
    scanner = redactor.scanner
    assert scanner._joint is (which != 3)  # an unjoinable rule: every text gated alone, as before

    values = st.one_of(_values, st.dictionaries(_keys, _values, max_size=8), st.lists(_values, max_size=6), _one_secret)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(values, st.booleans())
    def check(value: object, cold: bool) -> None:
        if cold:  # the texts found clean before: none, then (second apply) those of this value
            scanner._clean.clear()
        before = repr(value)
        expected = repr(_plain_walk(redactor, value))
        for _ in range(2):
            got = redactor.apply(value)
            assert repr(got) == expected
            if isinstance(value, dict | list | tuple):
                assert got is not value
        assert repr(value) == before  # the value itself is left alone
        for text in _strings(value):  # what is remembered as clean holds no secret
            if text in scanner._clean:
                assert scanner.spans(text) == [], text

    check()


def test_a_record_with_secrets_spliced_anywhere_leaks_none() -> None:
    redactor = Redactor.from_settings(_SETTINGS)
    record: dict[str, Any] = {"call_id": "01a237dd4e727e25ad274d285cb1a8c6", "reasons": [], "arguments": {}}
    for i, secret in enumerate(SECRETS):
        record["arguments"][f"a{i}"] = secret.text
        record["reasons"].append(f"argument a{i} is {secret.text!r}")
    redacted = redactor.apply(record)
    assert repr(redacted) == repr(_plain_walk(redactor, record))
    written = repr(redacted)
    for secret in SECRETS:
        for part in secret.parts:
            assert part not in written, (secret.shape, part)


@pytest.mark.parametrize("secret", _SECRET_TEXTS)
def test_the_joined_search_finds_what_each_texts_search_finds(secret: str) -> None:
    scanner = Redactor(_SETTINGS.redact_fields, [*_SETTINGS.redact_patterns, *_EXTRA]).scanner
    gate, joint = scanner._gate_match, scanner._joint_gate
    assert gate is not None
    assert joint is not None
    for before, after in ((), ()), (("x",), ("y",)), (("call 1", "word\n"), ("\nword", "")), (("a" * 300,), ("b=",)):
        texts = [*before, secret, *after]
        if scanner.spans(secret):
            assert len(before) in scanner.suspects(texts), texts
            assert secret not in scanner._clean
        data = secret.encode()
        if secret.isascii() and gate(_anchor(), data, 0, len(data))[0][0] >= 0:  # the per-text gate's "maybe"
            joined = "\n".join(texts).encode()
            assert joint(_anchor(), joined, 0, len(joined))[0][0] >= 0, texts


def _anchor() -> Any:
    from server.audit.redaction import _UNANCHORED

    return _UNANCHORED


def test_the_gate_searches_through_the_wrapper_where_re2_has_no_match_of_its_own() -> None:
    from server.audit.redaction import _match_of

    class _Wrapper:  # a google-re2 whose compiled pattern has only the public `search`
        def __init__(self, text: bytes) -> None:
            self.text = text

        def search(self, data: bytes, pos: int, endpos: int) -> object:
            return True if self.text in data[pos:endpos] else None

    match = _match_of(_Wrapper(b"AKIA"))
    assert match(None, b"x AKIA y", 0, 8)[0][0] >= 0
    assert match(None, b"x AKIB y", 0, 8)[0][0] < 0


def test_anchored_patterns_match_a_text_in_the_middle_of_a_value() -> None:
    redactor = Redactor(patterns=[r"^corp-[0-9]{6}$", r"\bemp[0-9]{4}\b"])
    value = {"a": "x", "b": ["y", "corp-123456", "z", "emp1234"], "c": "corp-123456 trailing", "d": "xemp1234"}
    assert redactor.apply(value) == {
        "a": "x",
        "b": ["y", REDACTED, "z", REDACTED],
        "c": "corp-123456 trailing",
        "d": "xemp1234",
    }


@pytest.mark.parametrize("pattern", [r"\Acorp-[0-9]{6}", r"corp-[0-9]{6}\Z", r"(?-m:^)corp-[0-9]{6}"])
def test_a_gate_whole_texts_anchor_is_not_joined(pattern: str) -> None:
    redactor = Redactor(patterns=[pattern])
    assert not redactor.scanner._joint
    value = {"a": "x", "b": ["y", "corp-123456", "z"]}
    assert redactor.apply(value) == {"a": "x", "b": ["y", REDACTED, "z"]}
    assert repr(redactor.apply(value)) == repr(_plain_walk(redactor, value))


@pytest.mark.parametrize(
    ("pattern", "joinable"),
    [
        (r"https://hooks\.slack\.com/services/T[a-zA-Z0-9_]+", True),
        (r"(?i)\bcorp[0-9]+\b|x(?:ab)*?y", True),
        (r"(?<=id:)zz[0-9]{4}", False),
        (r"zz(?=[0-9])", False),
        (r"^zz", False),
        (r"zz$", False),
        (r"ref-[0-9]++!", False),
        (r"(?>ab)c", False),
        (r"(a)\1", False),
        (r"(a)?(?(1)b|c)", False),
    ],
)
def test_which_rules_the_joined_text_is_searched_with(pattern: str, joinable: bool) -> None:
    import re

    assert _joinable(_Rule(re.compile(pattern), 0)) is joinable


def test_the_rule_re2_cannot_take_is_searched_in_the_joined_text_ignoring_case() -> None:
    scanner = SecretScanner()
    assert [rule.pattern.pattern for rule in scanner._always] == [
        r"https://hooks\.slack\.com/services/T[a-zA-Z0-9_]+/B[a-zA-Z0-9_]+/[a-zA-Z0-9_]+"
    ]
    hook = "HTTPS://Hooks.Slack.com/services/T0ABCDEF/B0ABCDEF/abcdefghijklmnop"
    assert scanner.spans(hook)
    assert scanner.suspects(["a", f"see {hook}", "b"]) == [0, 1, 2]
    assert scanner.suspects(["a", "see https://hooks.slack.com/about", "b"]) == []


def test_keys_that_redaction_changes_take_the_plain_walk() -> None:
    # Both keys redact to one name: the later member is the one kept, as the walk keeps it.
    redactor = Redactor.from_settings(_SETTINGS)
    for value in (
        {"AKIAIOSFODNN7EXAMPLE": "call 1", "AKIAIOSFODNN7EXAMPLF": "plain"},
        {"AKIAIOSFODNN7EXAMPLE": "password=hunter2abc", "AKIAIOSFODNN7EXAMPLF": 7},
        {"AKIAIOSFODNN7EXAMPLE": {"x": "y"}, "AKIAIOSFODNN7EXAMPLF": "fresh text 42"},
    ):
        redactor.scanner._clean.clear()
        assert repr(redactor.apply(value)) == repr(_plain_walk(redactor, value))
        assert list(redactor.apply(value)) == [REDACTED]


def test_what_comes_back_is_a_new_value_at_every_depth() -> None:
    # Callers set members of what `apply` returns (the records put the arguments in): never the caller's.
    redactor = Redactor.from_settings(_SETTINGS)
    value: dict[str, Any] = {"a": {"b": ["c", {"d": "e"}]}, "t": ("x", "y")}
    got = redactor.apply(value)
    assert got == {"a": {"b": ["c", {"d": "e"}]}, "t": ["x", "y"]}
    assert got is not value
    assert got["a"] is not value["a"]
    assert got["a"]["b"] is not value["a"]["b"]
    assert got["a"]["b"][1] is not value["a"]["b"][1]


def test_texts_found_clean_are_remembered_within_bounds() -> None:
    scanner = SecretScanner()
    scanner._clean.clear()
    assert scanner.suspects(["run 1", "x" * 300]) == []
    assert "run 1" in scanner._clean
    assert "x" * 300 not in scanner._clean
    assert scanner.suspects(["run 2", "password=hunter2abc"]) == [0, 1]
    assert "run 2" not in scanner._clean
    assert "password=hunter2abc" not in scanner._clean
    # Non-ASCII text is scanned alone, as the gate has it; the ASCII ones beside it are still joined.
    assert scanner.suspects(["run 3", "Schlüssel", "run 4"]) == [1]
    assert "run 3" in scanner._clean
    assert "Schlüssel" not in scanner._clean
    assert scanner.suspects(["run 5", "Schlüssel", "password=hunter2abc"]) == [0, 1, 2]
    assert scanner.suspects(["Schlüssel", "秘密"]) == [0, 1]
    for i in range(_CLEAN_ENTRIES + 10):
        scanner.suspects([f"t{i}"])
    assert len(scanner._clean) <= _CLEAN_ENTRIES


def test_a_value_too_deep_for_the_plain_walk_is_no_worse_gated() -> None:
    # The gated walk goes as deep in frames as the plain one (one a container), less the frames the
    # plain one takes to redact a text: around the recursion limit it returns what the plain walk
    # returns, or gets further; it raises only where the plain walk raises too. One retry at most, not
    # one per level (the plain walk's own members are not gated again).
    import sys
    import time

    redactor = Redactor.from_settings(_SETTINGS)
    limit = sys.getrecursionlimit()
    wraps: list[tuple[int, Callable[[object], object]]] = [
        (2, lambda v: [v, "call 1"]),
        (1, lambda v: {"k": v, "t": "call 2"}),
        (4, lambda v: ("call 3", [v])),
    ]
    for frames, wrap in wraps:  # frames a level takes: lists in lists go through `_apply`
        value: object = "password=hunter2abc"
        for _ in range((limit - 150) // frames):  # the frames below this test's: fewer than 150
            value = wrap(value)
        outcomes = set()
        for depth in range((limit - 150) // frames, limit // frames + 5):
            value = wrap(value)
            started = time.process_time()
            try:
                plain: object = repr(redactor._apply(value))
            except RecursionError:
                plain = RecursionError
            try:
                gated: object = repr(redactor.apply(value))
            except RecursionError:
                gated = RecursionError
            assert time.process_time() - started < 1
            assert gated == plain or plain is RecursionError, depth
            outcomes.add(gated is RecursionError)
        assert outcomes == {True, False}  # the window holds the limit


def test_texts_the_joined_search_cannot_clear_are_remembered_redacted_alone() -> None:
    # `xtok-12345` sets the gate off (the lookbehind is not in it) but holds no secret, and non-ASCII
    # text is scanned alone: both remembered as clean once redacted as themselves, so the next value
    # with them is joined again; a secret never is.
    redactor = Redactor(patterns=[r"(?<![a-z])tok-[0-9]{5}"])
    scanner = redactor.scanner
    scanner._clean.clear()
    value = {"a": "xtok-12345", "b": "call 9", "c": "Schlüssel", "d": "tok-54321"}
    assert redactor.apply(value) == {"a": "xtok-12345", "b": "call 9", "c": "Schlüssel", "d": REDACTED}
    assert {"xtok-12345", "call 9", "Schlüssel"} <= scanner._clean
    assert "tok-54321" not in scanner._clean
    assert scanner.suspects(["xtok-12345", "call 10"]) == [0, 1]  # the joined search alone would not clear it
    assert redactor.apply({"a": "xtok-12345", "b": "call 11"}) == {"a": "xtok-12345", "b": "call 11"}
    assert "call 11" in scanner._clean
    # The secret is remembered the other way: redacted at once, it no longer sets the search off.
    assert "tok-54321" in scanner._dirty
    assert redactor.apply(["tok-54321", "call 12", {"d": "tok-54321"}]) == [REDACTED, "call 12", {"d": REDACTED}]
    assert "call 12" in scanner._clean


_RECORD: dict[str, Any] = {
    "call_id": "01a237dd4e727e25ad274d285cb1a8c6",
    "time": "2026-12-02T17:46:20.146648+00:00",
    "tool": "echo",
    "groups": ["analysts", "admins"],
    "arguments": {"text": "call 1", "limit": 3},
    "reasons": [],
    "timings_ms": {"policy": 0.2692},
    "content": {
        "parts": [{"kind": "text", "sha256": "0f26ed5d370bf1cc54f7b6125ba506becc6548e25c85f39994c50ce750676f01"}]
    },
}


@pytest.mark.parametrize("which", range(4), ids=["configured", "obligation-fields", "patterns", "unjoinable"])
def test_one_secret_in_each_place_of_a_record_is_redacted_as_the_plain_walk_does(which: int) -> None:
    # Every secret shape and edge case, whole or spliced into the text, in each place of a record whose
    # other texts are clean: the joined search alone has to find it (the texts around it new, or known).
    redactor = _redactors()[which]
    places = sum(1 for _ in _member_texts(_RECORD))
    for secret in [*_ANCHORED, *(s.text for s in SECRETS[::5])]:
        for n in range(places * 3):
            value = _with_one_secret(_RECORD, secret, n)
            for cold in (True, False):
                if cold:
                    redactor.scanner._clean.clear()
                    redactor.scanner._dirty.clear()
                assert repr(redactor.apply(value)) == repr(_plain_walk(redactor, value)), (secret, n)


def test_a_mapping_naming_a_key_twice_keeps_the_later_member_as_the_plain_walk_does() -> None:
    # The gated walk notes where a text went: a place written again after it (a Mapping's items may
    # name a key twice) would be overwritten by the text's redaction. Mappings not dicts: plain walk.
    redactor = Redactor.from_settings(_SETTINGS)
    for pairs in (
        [("a", "password=hunter2abc"), ("a", 5)],
        [("a", "password=hunter2abc"), ("a", "call 5")],
        [(1, "password=hunter2abc"), (1, {"b": "c"})],
    ):
        value = {"m": _Pairs(pairs), "n": [_Pairs(pairs)]}
        assert repr(redactor.apply(value)) == repr(_plain_walk(redactor, value))
        assert repr(redactor.apply(_Pairs(pairs))) == repr(_plain_walk(redactor, _Pairs(pairs)))


def _every_rule_spans(scanner: SecretScanner, text: str) -> list[tuple[int, int]]:
    """`spans` with no gate and no prefilter: every rule searched in the text."""
    from server.audit.redaction import _PEM_END, _merge, _widen

    found = []
    for rule in scanner._rules:
        for match in rule.pattern.finditer(text):
            start, end = match.span(rule.group)
            if start < 0 or start == end:
                continue
            if rule.private_key:
                end = _PEM_END.search(text, end).end()  # type: ignore[union-attr]
            found.append(_widen(text, start, end))
    return _merge(found)


@pytest.mark.parametrize("which", [0, 2, 3], ids=["configured", "patterns", "unjoinable"])
def test_the_gate_and_the_prefilter_find_what_every_rule_finds(which: int) -> None:
    scanner = _redactors()[which].scanner
    for text in [*_SECRET_TEXTS, *ORDINARY, *(t.upper() for t in _ANCHORED)]:
        assert scanner.spans(text) == _every_rule_spans(scanner, text), text

    @settings(max_examples=200, deadline=None)
    @given(_texts)
    def check(text: str) -> None:
        assert scanner._spans(text) == tuple(_every_rule_spans(scanner, text))

    check()


def test_long_texts_are_joined_and_never_remembered() -> None:
    redactor = Redactor.from_settings(_SETTINGS)
    scanner = redactor.scanner
    big = "word " * 4_000  # 20 kB: the full scan of every rule is what the plain walk pays
    for value in (
        {"a": big, "b": "call 1"},
        {"a": big + " password=hunter2abc", "b": "call 2"},
        ["call 3", "password=hunter2abc " + big, big],
        {"a": big + "\nAKCp8abcdefghij1234\n" + big},
    ):
        assert repr(redactor.apply(value)) == repr(_plain_walk(redactor, value))
        assert big not in scanner._clean
        assert big not in scanner._dirty
