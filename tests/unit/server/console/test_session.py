"""The sealed session cookie and the CSRF token bound to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.console.roles import Role, may_enter, roles_from_scopes
from server.console.session import SessionSealer

KEY = b"k" * 32


def test_a_sealed_session_opens_with_its_token_and_id() -> None:
    sealer = SessionSealer(KEY, 60)
    cookie, session = sealer.seal("the-token")
    opened = sealer.open(cookie)
    assert opened == session
    assert "the-token" not in cookie  # sealed, not only signed


def test_an_altered_or_foreign_cookie_opens_nothing() -> None:
    sealer = SessionSealer(KEY, 60)
    cookie, _ = sealer.seal("the-token")
    flipped = cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1]
    assert sealer.open(flipped) is None
    assert SessionSealer(b"o" * 32, 60).open(cookie) is None
    assert sealer.open("not a cookie") is None
    assert sealer.open("") is None


def test_a_session_older_than_its_maximum_age_is_over() -> None:
    sealer = SessionSealer(KEY, 60)
    cookie, session = sealer.seal("t", now=1000.0)
    assert sealer.open(cookie, now=1059.0) == session
    assert sealer.open(cookie, now=1061.0) is None


def test_a_csrf_token_is_worth_something_only_for_its_own_session() -> None:
    sealer = SessionSealer(KEY, 60)
    _, one = sealer.seal("t")
    _, other = sealer.seal("t")
    token = sealer.csrf_token(one.sid)
    assert sealer.csrf_valid(one.sid, token)
    assert not sealer.csrf_valid(other.sid, token)
    assert not sealer.csrf_valid(one.sid, None)
    assert not sealer.csrf_valid(None, token)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SessionSealer(b"short", 60)


def test_the_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "console-session.key"
    first = SessionSealer.from_file(path, 60)
    cookie, _ = first.seal("t")
    assert path.stat().st_mode & 0o777 == 0o600
    assert SessionSealer.from_file(path, 60).open(cookie) is not None


def test_roles_come_from_scopes_and_only_audit_enters() -> None:
    assert roles_from_scopes(["castellan:admin"]) == frozenset(Role)
    assert roles_from_scopes(["castellan:audit", "castellan:approve"]) == {Role.AUDIT, Role.APPROVE}
    assert not may_enter(roles_from_scopes(["castellan:approve"]))
    assert not may_enter(roles_from_scopes(["castellan:metrics", "read"]))
    assert may_enter(roles_from_scopes(["castellan:audit"]))
