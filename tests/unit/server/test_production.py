"""Production mode refuses each unsafe setting by name, unless it is overridden by name."""

from __future__ import annotations

import pytest

from server.errors import ConfigError
from server.production import CHECKS, enforce_production, unsafe_settings
from server.settings import Settings


def _production(**overrides: object) -> Settings:
    return Settings(environment="production", **overrides)  # type: ignore[arg-type]


SAFE: dict[str, object] = {
    "demo": False,
    "auth": {"mode": "jwt", "issuer": "https://idp.example", "jwks_url": "https://idp.example/jwks",
             "max_token_lifetime_seconds": 3600},
    "server": {"metrics_auth": "token", "allowed_hosts": ["gateway.example:443"]},
    "audit": {"chain_key_file": "/run/secrets/audit-chain-key"},
}  # fmt: skip


def test_dev_defaults_are_refused_in_production_each_with_its_setting_named() -> None:
    with pytest.raises(ConfigError) as refused:
        enforce_production(_production())
    for setting in ("auth.mode", "demo", "auth.max_token_lifetime_seconds", "server.metrics_auth"):
        assert setting in str(refused.value)


def test_safe_settings_start_in_production() -> None:
    assert enforce_production(_production(**SAFE)) == []


EXCHANGING_OVER_HTTP = {
    "name": "inventory",
    "url": "https://inventory.example/mcp",
    "credential": "token_exchange",
    "token_exchange": {"token_url": "http://sts.example/token", "client_id": "gw"},
}
BROKERED = {
    "name": "saas",
    "url": "https://saas.example/mcp",
    "credential": "brokered",
    "oauth": {
        "authorize_url": "https://login.saas.example/auth",
        "token_url": "https://login.saas.example/token",
        "client_id": "gw",
    },
}


@pytest.mark.parametrize(
    ("setting", "change"),
    [
        ("auth.mode", {"auth": {**SAFE["auth"], "mode": "dev", "dev_issuer": False}}),  # type: ignore[dict-item]
        ("auth.issuer", {"auth": {**SAFE["auth"], "issuer": "castellan-dev"}}),  # type: ignore[dict-item]
        ("auth.max_token_lifetime_seconds", {"auth": {**SAFE["auth"], "max_token_lifetime_seconds": 0}}),  # type: ignore[dict-item]
        ("demo", {"demo": True}),
        ("server.allowed_hosts", {"server": {"metrics_auth": "token", "allowed_hosts": ["*"]}}),
        ("server.allowed_hosts", {"server": {"metrics_auth": "token", "allowed_hosts": ["*:443"]}}),
        ("server.metrics_auth", {"server": {"metrics_auth": "open"}}),
        ("audit.chain_key", {"audit": {}}),
        ("upstreams.credential_urls", {"upstreams": [EXCHANGING_OVER_HTTP]}),
        ("credentials.key", {"upstreams": [BROKERED]}),
        ("audit.chain_key", {"data_dir": "/data", "audit": {"chain_key_file": "/data/audit-chain-key"}}),
    ],
)
def test_one_unsafe_setting_is_refused_alone_and_accepted_only_by_its_own_override(
    setting: str, change: dict[str, object]
) -> None:
    settings = {**SAFE, **change}
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        enforce_production(_production(**settings))
    others = [name for name in CHECKS if name != setting]
    with pytest.raises(ConfigError):
        enforce_production(_production(**settings, production_overrides=others))
    accepted = enforce_production(_production(**settings, production_overrides=[setting]))
    assert [u.setting for u in accepted] == [setting]


def test_an_override_naming_no_check_is_an_error_even_in_dev() -> None:
    with pytest.raises(ConfigError, match="unknown checks"):
        enforce_production(Settings(production_overrides=["auth.mod"]))


def test_dev_mode_lists_what_production_would_refuse_without_refusing() -> None:
    settings = Settings()
    assert enforce_production(settings) == []
    assert {u.setting for u in unsafe_settings(settings)} >= {"auth.mode", "demo", "server.metrics_auth"}


def test_the_dev_issuer_is_refused_in_production_even_when_overridden() -> None:
    dev = {**SAFE, "auth": {**SAFE["auth"], "mode": "dev"}}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"auth\.dev_issuer: the dev issuer lets anyone"):
        enforce_production(_production(**dev, production_overrides=list(CHECKS)))
    off = {**SAFE, "auth": {**SAFE["auth"], "mode": "dev", "dev_issuer": False}}  # type: ignore[dict-item]
    assert [u.setting for u in enforce_production(_production(**off, production_overrides=["auth.mode"]))] == [
        "auth.mode"
    ]
