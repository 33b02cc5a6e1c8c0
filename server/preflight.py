"""Preflight: build every backend from the settings and reach each one, as `castellan check-config` reports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server import backends
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.errors import BackendUnavailable, ConfigError
from server.production import unsafe_settings
from server.sandbox import detect_mode
from server.settings import Settings
from server.upstream.connection import UpstreamConnection

_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Preflight:
    """What `check-config` found: warnings (unsafe but accepted), one check per backend, and the verdict."""

    warnings: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def verdict(self) -> str:
        failed = [c.name for c in self.checks if not c.ok]
        if failed:
            return f"check-config: failed ({len(failed)} of {len(self.checks)} checks: {', '.join(failed)})"
        return f"check-config: ok ({len(self.checks)} checks, {len(self.warnings)} warnings)"

    def document(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "warnings": self.warnings,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "verdict": self.verdict(),
        }


def _warnings(settings: Settings) -> list[str]:
    found = unsafe_settings(settings)
    if settings.environment == "production":
        overridden = set(settings.production_overrides)
        return [f"{u.setting}: accepted by production_overrides: {u.why}" for u in found if u.setting in overridden]
    return [f"{u.setting}: would be refused with environment = 'production': {u.why}" for u in found]


async def _timed(name: str, probe: Callable[[], Awaitable[str]], within: float = _TIMEOUT) -> Check:
    try:
        return Check(name, True, await asyncio.wait_for(probe(), within))
    except TimeoutError:
        return Check(name, False, f"no answer within {within:.0f}s")
    except BackendUnavailable as exc:
        return Check(name, False, "; ".join(exc.reasons))
    except Exception as exc:  # a preflight reports every failure; it never raises one
        return Check(name, False, f"{type(exc).__name__}: {str(exc)[:300]}")


def _answered(check: Callable[[], Awaitable[None]], detail: str) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        await check()
        return detail

    return probe


def _listed(connection: UpstreamConnection) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        return f"{len(await connection.list_tools())} tool(s) listed"

    return probe


async def preflight(settings: Settings) -> Preflight:
    """Build the gateway and reach every backend it would use: the issuer's keys, the policy engine, the grant
    source, the meter store, the audit outbox, MLflow, and each upstream (started and listed). Never raises."""
    from server.gateway import build_gateway
    from server.upstream.credentials import credential_check

    report = Preflight(warnings=_warnings(settings))
    try:
        gateway = build_gateway(settings)
    except ConfigError as exc:
        report.checks.append(Check("settings", False, str(exc)))
        return report
    except Exception as exc:  # a backend that cannot even be built is a failed check, never a traceback
        report.checks.append(Check("settings", False, f"the gateway could not be built: {type(exc).__name__}: {exc}"))
        return report
    report.checks.append(Check("settings", True, f"environment {settings.environment}"))
    try:
        sandbox = detect_mode(settings.tools.sandbox)  # how tool code is isolated here (the weaker mode says why)
    except ConfigError as exc:  # bubblewrap required and not usable here
        report.checks.append(Check("sandbox", False, str(exc)))
    else:
        report.checks.append(Check("sandbox", True, sandbox.describe()))
        if not sandbox.isolated:
            report.warnings.append(f"tools.sandbox: tools run without namespaces: {sandbox.describe()}")
    try:

        async def keys() -> str:
            found = await backends.make_key_source(settings).key_set(refresh=True)
            return f"{len(found.keys)} signing key(s) from {settings.auth.jwks_url or settings.auth.mode}"

        report.checks.append(await _timed("identity", keys))
        engine = f"{gateway.engine.name}, version {gateway.engine.policy_version}"
        for name, check, detail in (
            ("policy", gateway.engine.check, engine),
            ("grants", gateway.grant_source.check, settings.grants.backend),
            ("metering", gateway.meter.check, settings.metering.backend),
            ("audit", gateway.outbox.check, settings.audit.backend),
        ):
            report.checks.append(await _timed(name, _answered(check, detail)))
        if settings.audit.ship:
            uri = settings.audit.mlflow_tracking_uri or local_tracking_uri(settings.data_dir)

            async def mlflow() -> str:
                target = MlflowTarget(uri, settings.audit.mlflow_experiment)
                experiment = await asyncio.to_thread(target.experiment_id)
                return f"{uri}, experiment {settings.audit.mlflow_experiment!r} ({experiment})"

            # a new local store creates its tables first (MLflow's migrations: tens of seconds on 2 cores)
            report.checks.append(await _timed("mlflow", mlflow, within=120.0))
        if gateway.upstreams is not None:
            upstreams = gateway.upstreams
            for connection in upstreams.connections:
                report.checks.append(await _timed(f"upstream {connection.name}", _listed(connection)))
        for upstream in settings.upstreams:  # where each credential comes from, never its value
            ok, source = credential_check(upstream)
            report.checks.append(Check(f"credential {upstream.name}", ok, source))
    finally:
        await gateway.close()
    return report
