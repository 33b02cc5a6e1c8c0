"""Brokered grants at rest: sealed, bound to their row, revocable per user, links good once."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from server.credentials.sealing import Sealer, Unsealable
from server.credentials.store import GrantStore
from server.errors import ConfigError
from server.settings import Settings


def _store(tmp_path: Path) -> GrantStore:
    return GrantStore(tmp_path / "credentials.db", Sealer(os.urandom(32)))


def test_tokens_are_sealed_at_rest_and_read_back(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("saas", "alice", "access-AAAA", 2e9, "refresh-RRRR", "read")
    grant = store.get("saas", "alice")
    assert grant is not None
    assert (grant.access_token, grant.refresh_token, grant.scope) == ("access-AAAA", "refresh-RRRR", "read")
    raw = (tmp_path / "credentials.db").read_bytes() + (tmp_path / "credentials.db-wal").read_bytes()
    assert b"access-AAAA" not in raw
    assert b"refresh-RRRR" not in raw


def test_a_sealed_token_moved_to_another_users_row_does_not_open(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("saas", "alice", "alice-access", 2e9, "alice-refresh", "")
    store.put("saas", "mallory", "m-access", 2e9, "m-refresh", "")
    with sqlite3.connect(tmp_path / "credentials.db") as db:
        db.execute(
            "UPDATE grants SET refresh_token = (SELECT refresh_token FROM grants WHERE subject = 'alice') "
            "WHERE subject = 'mallory'"
        )
    with pytest.raises(Unsealable):
        store.get("saas", "mallory")


def test_revoking_one_users_grant_leaves_the_others(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for user in ("alice", "bob"):
        store.put("saas", user, f"{user}-a", 2e9, None, "")
    assert store.revoke("saas", "alice") == 1
    assert store.get("saas", "alice") is None
    assert store.get("saas", "bob") is not None
    assert [s.subject for s in store.summaries()] == ["bob"]


def test_a_rotated_refresh_token_replaces_the_old_one_and_none_keeps_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put("saas", "alice", "a1", 2e9, "r1", "")
    store.put("saas", "alice", "a2", 2e9, None, "")
    assert store.get("saas", "alice").refresh_token == "r1"  # type: ignore[union-attr]
    store.put("saas", "alice", "a3", 2e9, "r2", "")
    assert store.get("saas", "alice").refresh_token == "r2"  # type: ignore[union-attr]


def test_an_authorization_link_is_good_once_and_not_after_it_expires(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.begin("state-1", "saas", "alice", "verifier", ttl=60)
    pending = store.take("state-1")
    assert pending is not None
    assert (pending.subject, pending.code_verifier) == ("alice", "verifier")
    assert store.take("state-1") is None
    store.begin("state-2", "saas", "alice", "verifier", ttl=-1)
    assert store.take("state-2") is None


def test_the_dev_key_is_created_private_and_a_configured_key_must_be_32_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Sealer.from_settings(Settings(data_dir=tmp_path))
    assert stat.S_IMODE((tmp_path / "credentials-key").stat().st_mode) == 0o600
    monkeypatch.setenv("GRANTS_KEY", base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="32 bytes"):
        Sealer.from_settings(Settings(data_dir=tmp_path, credentials={"key": {"env": "GRANTS_KEY"}}))
