"""Backend registries: the word users write in config → the class that serves it, for each concern."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog

from server.audit.keys import chain_key_for
from server.audit.outbox import Outbox, SqliteOutbox
from server.auth.devkeys import dev_public_keys
from server.auth.keys import JwksKeys, KeySource, StaticKeys
from server.errors import ConfigError
from server.grants.databricks import DatabricksGrants
from server.grants.databricks_obo import DatabricksOnBehalfGrants, OnBehalf
from server.grants.local import LocalCatalog
from server.grants.source import GrantSource
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Meter
from server.metering.redis import RedisMeter
from server.metering.sqlite import SqliteMeter
from server.policy.bundle import PolicyBundle
from server.policy.circuit import Circuit
from server.policy.embedded import EmbeddedEngine, default_evaluator
from server.policy.engine import PolicyEngine
from server.policy.managed import ManagedOpa, find_opa
from server.policy.opa import OpaServerEngine
from server.settings import Settings

T = TypeVar("T")
log = structlog.get_logger("castellan.policy")


def _make_embedded(s: Settings) -> PolicyEngine:
    """In-process: OPA's own evaluator (the OPA library) when built, else regorus restricted to its
    verified subset; either refuses a policy it cannot decide exactly as OPA, naming the builtin."""
    evaluator = default_evaluator()
    engine = EmbeddedEngine(
        PolicyBundle.from_directory(s.policy.path),
        s.policy.entrypoint,
        s.policy.workers,
        s.policy.inline_max_us,
        evaluator=evaluator,
        timeout_seconds=s.policy.timeout_seconds,
        log_masks=s.policy.decision_log,  # the decision log's mask, evaluated with each decision
    )
    if evaluator == "opa-library":
        log.info("policy_engine_embedded", evaluator=evaluator, exact="OPA's own evaluator (OPA library)")
    else:
        log.warning(
            "policy_engine_embedded",
            evaluator=evaluator,
            exact="verified subset only: the OPA library is not built (scripts/build-opa-library needs Go)",
        )
    return engine


def _make_opa(s: Settings) -> PolicyEngine:
    if not s.policy.opa_url:
        raise ConfigError("policy.engine = 'opa' needs policy.opa_url")
    bundle = PolicyBundle.from_directory(s.policy.path) if s.policy.opa_push else None
    return OpaServerEngine(
        s.policy.opa_url,
        entrypoint=s.policy.entrypoint,
        bundle=bundle,
        timeout=s.policy.timeout_seconds,
        circuit=Circuit(s.policy.circuit_failures, s.policy.circuit_open_seconds),
    )


def _make_auto(s: Settings) -> PolicyEngine:
    """A managed local OPA when a binary is found (OPA is the reference), else the embedded engine."""
    binary = find_opa(s.policy.opa_binary)
    if binary is None:
        try:
            return _make_embedded(s)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (policy.engine = 'auto' would use OPA for it: install opa)") from None
    bundle = PolicyBundle.from_directory(s.policy.path)
    managed = ManagedOpa(binary)
    managed.start()
    return OpaServerEngine(
        managed.url,
        entrypoint=s.policy.entrypoint,
        bundle=bundle,
        timeout=s.policy.timeout_seconds,
        circuit=Circuit(s.policy.circuit_failures, s.policy.circuit_open_seconds),
        on_unavailable=managed.revive,
        on_close=managed.stop,
    )


def _make_keys(s: Settings) -> KeySource:
    auth = s.auth
    if auth.mode == "dev":
        return StaticKeys(dev_public_keys(s.data_dir))
    if not auth.issuer:
        raise ConfigError("auth.mode = 'jwt' needs auth.issuer (the identity provider's issuer URL)")
    if auth.jwks_url and auth.keys_file:
        raise ConfigError("auth: set jwks_url or keys_file, not both")
    if auth.jwks_url:
        return JwksKeys(auth.jwks_url, ttl=auth.jwks_cache_seconds)
    if auth.keys_file:
        return StaticKeys.from_file(auth.keys_file)
    raise ConfigError("auth.mode = 'jwt' needs auth.jwks_url or auth.keys_file")


ENGINES: dict[str, Callable[[Settings], PolicyEngine]] = {
    "auto": _make_auto,
    "embedded": _make_embedded,
    "opa": _make_opa,
}


def _make_databricks_grants(s: Settings, on_behalf: OnBehalf | None) -> GrantSource:
    """As the gateway (its own SDK credentials), or on behalf of each caller (its token federated)."""
    if s.grants.databricks_identity == "on_behalf_of_user":
        if on_behalf is None:
            raise ConfigError("grants.databricks_identity = 'on_behalf_of_user' needs the callers' tokens kept")
        return DatabricksOnBehalfGrants(on_behalf, s.grants.timeout_seconds)
    return DatabricksGrants.from_settings(
        s.grants.databricks_host, s.grants.databricks_profile, s.grants.timeout_seconds
    )


GRANT_SOURCES: dict[str, Callable[[Settings, OnBehalf | None], GrantSource]] = {
    "local": lambda s, _: LocalCatalog(s.data_file(s.grants.path, "catalog.db")),
    "databricks": _make_databricks_grants,
}

METERS: dict[str, Callable[[Settings], Meter]] = {
    "sqlite": lambda s: (
        BufferedSqliteMeter(
            s.data_file(s.metering.path, "meters.db"),
            heartbeat_seconds=s.metering.instance_heartbeat_seconds,
            instance_timeout=s.metering.instance_timeout_seconds,
            write_behind_seconds=s.metering.write_behind_seconds,
        )
        if s.metering.write_behind_seconds > 0
        else SqliteMeter(
            s.data_file(s.metering.path, "meters.db"),
            heartbeat_seconds=s.metering.instance_heartbeat_seconds,
            instance_timeout=s.metering.instance_timeout_seconds,
        )
    ),
    "redis": lambda s: RedisMeter(
        s.metering.redis_url,
        heartbeat_seconds=s.metering.instance_heartbeat_seconds,
        instance_timeout=s.metering.instance_timeout_seconds,
    ),
}

OUTBOXES: dict[str, Callable[[Settings], Outbox]] = {
    "sqlite": lambda s: SqliteOutbox(
        s.data_file(s.audit.path, "audit.db"),
        key=chain_key_for(s),
        checkpoints=s.audit.checkpoint_path,
        checkpoint_seconds=s.audit.checkpoint_interval_seconds,
        outcome_commit_seconds=s.audit.outcome_commit_seconds,
    ),
}


def _pick(kind: str, table: dict[str, Callable[[Settings], T]], key: str, settings: Settings) -> T:
    if key not in table:
        raise ConfigError(f"unknown {kind} {key!r}; choose from {sorted(table)}")
    return table[key](settings)


def make_engine(s: Settings) -> PolicyEngine:
    return _pick("policy engine", ENGINES, s.policy.engine, s)


def make_grant_source(s: Settings, on_behalf: OnBehalf | None = None) -> GrantSource:
    """`on_behalf`: the federation of the callers' tokens, for a source that acts on their behalf."""
    if s.grants.backend not in GRANT_SOURCES:
        raise ConfigError(f"unknown grants backend {s.grants.backend!r}; choose from {sorted(GRANT_SOURCES)}")
    return GRANT_SOURCES[s.grants.backend](s, on_behalf)


def make_meter(s: Settings) -> Meter:
    return _pick("meter backend", METERS, s.metering.backend, s)


def make_outbox(s: Settings) -> Outbox:
    return _pick("audit backend", OUTBOXES, s.audit.backend, s)


def make_key_source(s: Settings) -> KeySource:
    return _make_keys(s)
