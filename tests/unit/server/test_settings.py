from __future__ import annotations

from pathlib import Path

import pytest

from server.backends import make_meter
from server.errors import ConfigError
from server.settings import load_settings


def test_defaults_need_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.resource_url == "http://127.0.0.1:8750/mcp"
    assert (settings.policy.engine, settings.grants.backend, settings.metering.backend) == (
        "auto",
        "local",
        "sqlite",
    )


def test_env_vars_set_nested_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CASTELLAN_SERVER__PORT", "9000")
    monkeypatch.setenv("CASTELLAN_METERING__LIMITS__MAX_REPEATS", "2")
    settings = load_settings()
    assert settings.resource_url == "http://127.0.0.1:9000/mcp"
    assert settings.metering.limits.max_repeats == 2


def test_a_toml_file_is_read_and_env_overrides_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "castellan.toml"
    config.write_text('[server]\npublic_url = "https://gw.example.com"\nport = 7000\n[auth]\nissuer = "https://idp"\n')
    monkeypatch.setenv("CASTELLAN_SERVER__PORT", "7001")
    settings = load_settings(config)
    assert settings.resource_url == "https://gw.example.com/mcp"
    assert settings.server.port == 7001
    assert settings.auth.issuer == "https://idp"


def test_invalid_settings_list_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nport = "many"\nmax_body_bytes = -1\n[nonsense]\nx = 1\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "server.port" in message
    assert "server.max_body_bytes" in message
    assert "nonsense" in message


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_an_unknown_backend_names_the_choices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CASTELLAN_METERING__BACKEND", "memcached")
    with pytest.raises(ConfigError, match=r"unknown meter backend 'memcached'; choose from \['redis', 'sqlite'\]"):
        make_meter(load_settings())
