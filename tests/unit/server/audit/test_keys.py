"""Where the chain key comes from, and that production will not start without one of its own."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from server.audit.keys import DEV_KEY_FILE, chain_key_for, load_chain_key
from server.errors import ConfigError
from server.settings import load_settings


def test_dev_creates_a_private_key_on_first_start_and_reuses_it(tmp_path: Path) -> None:
    first = load_chain_key(key=None, key_file=None, data_dir=tmp_path, environment="dev")
    again = load_chain_key(key=None, key_file=None, data_dir=tmp_path, environment="dev")
    assert first.secret == again.secret
    assert stat.S_IMODE((tmp_path / DEV_KEY_FILE).stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="has not started here yet"):
        load_chain_key(key=None, key_file=None, data_dir=tmp_path / "other", environment="dev", create=False)


def test_production_refuses_to_start_without_a_configured_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs an audit chain key kept outside the data directory"):
        chain_key_for(load_settings(None, environment="production", data_dir=tmp_path))
    assert not (tmp_path / DEV_KEY_FILE).exists()
    accepted = load_settings(
        None, environment="production", data_dir=tmp_path, production_overrides=["audit.chain_key"]
    )
    assert chain_key_for(accepted).source == str(tmp_path / DEV_KEY_FILE)  # only when overridden by name


def test_a_key_from_a_file_or_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "mounted-secret"
    secret.write_text("k" * 40 + "\n")
    from_file = chain_key_for(load_settings(None, environment="production", audit={"chain_key_file": secret}))
    assert from_file.secret == b"k" * 40
    monkeypatch.setenv("CASTELLAN_AUDIT__CHAIN_KEY", "e" * 32)
    from_env = chain_key_for(load_settings(None, environment="production"))
    assert (from_env.secret, from_env.key_id) == (b"e" * 32, from_env.key_id)
    assert from_env.key_id != from_file.key_id
    with pytest.raises(ConfigError, match="too short"):
        load_chain_key(key="short", key_file=None, data_dir=tmp_path, environment="dev")
    with pytest.raises(ConfigError, match="chain_key_file"):
        load_chain_key(key=None, key_file=tmp_path / "missing", data_dir=tmp_path, environment="production")


def test_a_binary_key_file_is_a_key_and_reaches_the_shipper_as_text(tmp_path: Path) -> None:
    """A mounted secret of raw bytes (`head -c 32 /dev/urandom`) works: the same key each load, printable,
    so the gateway can hand it to its shipper child."""
    path = tmp_path / "key"
    path.write_bytes(b"\xe6" + bytes(range(31)) + b"\xff")
    key = load_chain_key(key=None, key_file=path, data_dir=tmp_path, environment="production")
    assert key.secret.decode() == path.read_bytes().hex()
    assert key.key_id == load_chain_key(key=None, key_file=path, data_dir=tmp_path, environment="production").key_id


def test_a_short_binary_key_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"\xe6\xff" * 4)
    with pytest.raises(ConfigError, match="too short"):
        load_chain_key(key=None, key_file=path, data_dir=tmp_path, environment="production")
