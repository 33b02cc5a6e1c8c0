from __future__ import annotations

import pytest

from server.audit.redaction import REDACTED, Redactor, SecretScanner
from server.settings import AuditSettings
from tests.secret_shapes import SEED, SHAPES, Secret, leaks, secret_field

# Five fresh secrets of every shape per run (the seed is in the test ids, to replay a failure).
SECRETS = [shape() for shape in SHAPES for _ in range(5)]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor.from_settings(AuditSettings())


@pytest.mark.parametrize("secret", SECRETS, ids=[f"{s.shape}-{SEED}-{i}" for i, s in enumerate(SECRETS)])
def test_every_shape_of_secret_is_redacted(redactor: Redactor, secret: Secret) -> None:
    redacted = redactor.text(secret.text)
    assert REDACTED in redacted
    assert not leaks(redacted, [secret]), redacted


@pytest.mark.parametrize("secret", SECRETS[::3], ids=[f"{s.shape}-{SEED}" for s in SECRETS[::3]])
def test_secrets_in_non_ascii_text_are_redacted(redactor: Redactor, secret: Secret) -> None:
    # Non-ASCII text skips the RE2 gate and takes the full scan.
    redacted = redactor.text(f"Schlüssel für café — {secret.text} — 秘密")
    assert not leaks(redacted, [secret]), redacted
    assert redacted.startswith("Schlüssel für café — ")


@pytest.mark.parametrize("secret", SECRETS, ids=[f"{s.shape}-{SEED}-{i}" for i, s in enumerate(SECRETS)])
def test_secrets_quoted_again_by_repr_or_json_are_redacted(redactor: Redactor, secret: Secret) -> None:
    # A reason like f"text: {value!r} is too long" escapes the value's quotes (`db_pass=\\'v\\'`), and a
    # JSON document escapes them once more: the quoting must not hide the value from the detectors.
    import json

    for escaped in (repr(secret.text), json.dumps(repr(secret.text)), json.dumps(json.dumps(secret.text))):
        assert not leaks(redactor.text(f"text: {escaped} is too long"), [secret]), escaped


def test_the_rest_of_the_text_is_kept(redactor: Redactor) -> None:
    assert redactor.text("connect to postgres://app:Xk29dLq8rTz@db:5432/x now") == (
        "connect to postgres://app:[REDACTED]@db:5432/x now"
    )
    assert redactor.text("password=hunter2abc") == "password=[REDACTED]"
    assert redactor.text("Authorization: Bearer abcDEF123456789xyz") == "Authorization: Bearer [REDACTED]"


def test_high_entropy_values_of_secret_named_fields_are_redacted(redactor: Redactor) -> None:
    for _ in range(10):
        name, value = secret_field()
        redacted = redactor.apply({"config": {name: value, "sort_key": "name"}})
        assert redacted == {"config": {name: REDACTED, "sort_key": "name"}}


def test_low_entropy_values_of_secret_named_fields_are_kept(redactor: Redactor) -> None:
    kept = {"session_id": "run-1", "auth_mode": "oauth", "tokens_used": 1200, "credential_kind": "service principal"}
    assert redactor.apply(kept) == kept


def test_configured_fields_are_redacted_at_any_depth_and_keys_too(redactor: Redactor) -> None:
    value = {"a": [{"Password": "x"}], "API_KEY": {"nested": 1}, "AKIAIOSFODNN7EXAMPLE": 1}
    assert redactor.apply(value) == {"a": [{"Password": REDACTED}], "API_KEY": REDACTED, REDACTED: 1}


def test_obligation_fields_add_to_the_configured_ones(redactor: Redactor) -> None:
    assert redactor.with_fields(["email"]).apply({"email": "a@b.c", "name": "n"}) == {"email": REDACTED, "name": "n"}
    assert redactor.apply({"email": "a@b.c"}) == {"email": "a@b.c"}


ORDINARY = [
    "hello world",
    "SELECT region, sum(amount) FROM main.sales.orders WHERE region = 'EU' GROUP BY 1",
    "the password policy says twelve characters",
    "token budget exhausted",
    "max_tokens: 100000",
    "argument text must be a string of at most 200 characters",
    'argument text contains blocked text "drop table"',
    "tool demo.reset is destructive: only groups admins may call it",
    "missing privilege EXECUTE on main.tools.echo",
    "2026-11-23T12:00:00.123456Z",
    "3f9a8b7c-6d5e-4f3a-2b1c-0d9e8f7a6b5c",
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "tr-3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
    "https://example.com/docs?page=2&sort=asc",
    "/var/lib/castellan/audit.db",
    "c-001 bought 3 items for 12.50 EUR",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_left_alone(redactor: Redactor, text: str) -> None:
    assert redactor.text(text) == text


def test_configured_patterns_are_used() -> None:
    assert Redactor(patterns=[r"corp-[0-9]{6}"]).text("id corp-123456 here") == "id [REDACTED] here"


def test_the_detectors_are_detect_secrets_gated_by_one_re2_pass() -> None:
    scanner = SecretScanner()
    # Every detector RE2 can express is behind the gate; those it cannot always run.
    assert scanner._gate is not None
    assert len(scanner._always) <= 2
    assert scanner.spans("nothing to see here") == []


class _Text(str):
    """A `str` subclass (a value some library hands over): walked by `isinstance`, not the fast path."""


def _plain_walk(redactor: Redactor, value: object) -> object:
    """What `Redactor.apply` promises, member by member, with no fast path: the reference it is held to."""
    from collections.abc import Mapping

    from server.audit.redaction import _NAMED, _SECRET_LOOKING, _high_entropy

    if isinstance(value, str):
        return redactor.text(value)
    if isinstance(value, Mapping):
        out: dict[object, object] = {}
        for key, member in value.items():
            if not isinstance(key, str):
                out[key] = _plain_walk(redactor, member)
                continue
            redacted_key, kind = redactor._key(key)
            if kind == _NAMED or (kind == _SECRET_LOOKING and isinstance(member, str) and _high_entropy(member)):
                out[redacted_key] = REDACTED
            else:
                out[redacted_key] = _plain_walk(redactor, member)
        return out
    if isinstance(value, list | tuple):
        return [_plain_walk(redactor, v) for v in value]
    return value


def _json_like() -> object:
    from hypothesis import strategies as st

    texts = st.one_of(
        st.sampled_from(["password", "api_key", "db_token", "name", "x-auth", "session_id", "AKIAIOSFODNN7EXAMPLE"]),
        st.sampled_from([s.text for s in SECRETS] + ORDINARY + ["a" * 300 + " password=hunter2abc"]),
        st.text(max_size=20),
        st.builds(lambda n: "".join(__import__("secrets").token_hex(n)), st.integers(6, 20)),
    )
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts, texts.map(_Text),
        st.just(b"bytes"), st.just(frozenset({"x"})),
    )  # fmt: skip
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.lists(inner, max_size=5).map(tuple),
            st.dictionaries(st.one_of(texts, texts.map(_Text), st.integers(), st.none()), inner, max_size=6),
        ),
        max_leaves=30,
    )


def test_the_fast_walk_redacts_as_the_plain_walk_does() -> None:
    from hypothesis import given, settings

    redactor = Redactor.from_settings(AuditSettings()).with_fields(["email", "name"])

    @settings(max_examples=400, deadline=None)
    @given(_json_like())
    def check(value: object) -> None:
        record = {"record": value, "rows": [value, {"password": value}]}
        # repr: the same members in the same order (what the JSON of a record is made from), same types
        assert repr(redactor.apply(value)) == repr(_plain_walk(redactor, value))
        assert repr(redactor.apply(record)) == repr(_plain_walk(redactor, record))

    check()
