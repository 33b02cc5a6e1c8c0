"""Production mode: the settings that are fine on a laptop and unsafe in a deployment, refused at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.errors import ConfigError
from server.settings import Settings


@dataclass(frozen=True, slots=True)
class UnsafeSetting:
    """One setting that production mode refuses: its dotted name (also the key that overrides it) and why."""

    setting: str
    why: str


def _dev_auth(s: Settings) -> str | None:
    if s.auth.mode == "dev":
        return "dev tokens are signed by a key the gateway keeps in its data directory; use auth.mode = 'jwt'"
    return None


def _dev_issuer_enabled(s: Settings) -> str | None:
    if s.auth.mode == "dev" and s.auth.dev_issuer:
        return (
            "the dev issuer lets anyone who reaches the gateway sign in as any demo identity, admins included; "
            "set auth.dev_issuer = false (this one cannot be overridden)"
        )
    return None


def _demo(s: Settings) -> str | None:
    if s.demo:
        return "serves the demo tools, demo data and demo grants; set demo = false"
    return None


def _dev_issuer(s: Settings) -> str | None:
    if s.auth.mode == "jwt" and s.auth.issuer == "castellan-dev":
        return "the issuer is the dev placeholder 'castellan-dev'; set your identity provider's issuer"
    return None


def _token_lifetime(s: Settings) -> str | None:
    if not s.auth.max_token_lifetime_seconds:
        return "tokens of any lifetime are accepted; set the longest lifetime (exp - iat) to accept, e.g. 3600"
    return None


def _wildcard_hosts(s: Settings) -> str | None:
    wild = [h for h in s.server.allowed_hosts if h.split(":", 1)[0] in ("*", "")]
    if wild:
        return f"{wild} lets any Host header through (DNS rebinding); list the names the gateway is served under"
    return None


def _open_metrics(s: Settings) -> str | None:
    if s.server.metrics_auth == "open":
        return "/metrics answers without a token; set server.metrics_auth = 'token' (scope castellan:metrics)"
    return None


def _audit_chain_key(s: Settings) -> str | None:
    if s.audit.chain_key is None and s.audit.chain_key_file is None:
        return (
            "the audit chain key would be generated in the data directory, where whoever can rewrite the "
            "outbox can read it; set audit.chain_key_file (a mounted secret) or CASTELLAN_AUDIT__CHAIN_KEY"
        )
    data_dir = s.data_dir.resolve()
    if s.audit.chain_key_file is not None and s.audit.chain_key_file.resolve().is_relative_to(data_dir):
        return f"audit.chain_key_file {s.audit.chain_key_file} is inside the data directory; keep it outside"
    return None


def _plain_http_webhook(s: Settings) -> str | None:
    from urllib.parse import urlsplit

    url = urlsplit(s.approvals.webhook_url)
    if url.scheme == "http" and url.hostname not in ("127.0.0.1", "::1", "localhost"):
        return "approval requests (who calls what, with which arguments) would be sent in clear; use https"
    return None


def _credentials_key(s: Settings) -> str | None:
    if not any(u.credential == "brokered" for u in s.upstreams):
        return None
    key = s.credentials.key
    if not key.env and key.file is None:
        return (
            "brokered upstream grants would be sealed with a key generated into the data directory, beside the "
            "grants; set credentials.key to an environment variable or a mounted file outside it"
        )
    if key.file is not None and key.file.resolve().is_relative_to(s.data_dir.resolve()):
        return f"credentials.key file {key.file} is inside the data directory; keep it outside"
    return None


def _plain_http_credential_service(s: Settings) -> str | None:
    """Token exchange sends the caller's token, a brokered grant its refresh token: never in clear off the host."""
    from urllib.parse import urlsplit

    for u in s.upstreams:
        urls = [u.token_exchange.token_url] if u.credential == "token_exchange" and u.token_exchange else []
        if u.credential == "brokered" and u.oauth is not None:
            urls += [u.oauth.authorize_url, u.oauth.token_url]
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
                return f"upstream {u.name}: {url} would carry users' tokens in clear; use https"
    return None


CHECKS: dict[str, Callable[[Settings], str | None]] = {
    "approvals.webhook_url": _plain_http_webhook,
    "credentials.key": _credentials_key,
    "upstreams.credential_urls": _plain_http_credential_service,
    "audit.chain_key": _audit_chain_key,
    "auth.mode": _dev_auth,
    "auth.dev_issuer": _dev_issuer_enabled,
    "auth.issuer": _dev_issuer,
    "auth.max_token_lifetime_seconds": _token_lifetime,
    "demo": _demo,
    "server.allowed_hosts": _wildcard_hosts,
    "server.metrics_auth": _open_metrics,
}


NEVER_OVERRIDDEN = frozenset({"auth.dev_issuer"})
"""Refused in production even when listed in `production_overrides`: no deployment is safe with them."""


def unsafe_settings(settings: Settings) -> list[UnsafeSetting]:
    """What production mode would refuse in `settings`, whatever the environment, overrides included."""
    found = []
    for name, check in CHECKS.items():
        why = check(settings)
        if why is not None:
            found.append(UnsafeSetting(name, why))
    return found


def enforce_production(settings: Settings) -> list[UnsafeSetting]:
    """In production, raise `ConfigError` naming every unsafe setting not listed in
    `production_overrides`; return the overridden ones (to be logged as warnings). In dev, return []."""
    unknown = sorted(set(settings.production_overrides) - set(CHECKS))
    if unknown:
        raise ConfigError(f"production_overrides names unknown checks {unknown}; choose from {sorted(CHECKS)}")
    if settings.environment != "production":
        return []
    found = unsafe_settings(settings)
    refused = [u for u in found if u.setting not in settings.production_overrides or u.setting in NEVER_OVERRIDDEN]
    if refused:
        lines = "; ".join(f"{u.setting}: {u.why}" for u in refused)
        raise ConfigError(
            f"environment = 'production' refuses {len(refused)} unsafe setting(s): {lines} "
            "(to accept one knowingly, list its name in production_overrides)"
        )
    return [u for u in found if u.setting in settings.production_overrides]
