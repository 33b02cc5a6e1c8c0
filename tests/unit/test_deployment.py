"""The deployment files are true: the image runs production mode, and compose.yaml's gateways pass it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from server.production import enforce_production
from server.settings import REPO_ROOT, load_settings

COMPOSE = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
GATEWAYS = [name for name, service in COMPOSE["services"].items() if service.get("build") == "."]


def _interpolate(value: str) -> str:
    """Compose's `${VAR:?message}`: an operator's value (an example one here)."""
    return re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"https://{m.group(1).lower().replace('_', '-')}.example", value)


def _environment(service: str) -> dict[str, str]:
    return {k: _interpolate(str(v)) for k, v in COMPOSE["services"][service]["environment"].items()}


def test_compose_runs_two_gateway_replicas_beside_redis_opa_and_mlflow_on_postgres() -> None:
    assert len(GATEWAYS) == 2
    assert {"redis", "opa", "mlflow", "postgres"} <= set(COMPOSE["services"])
    assert "--bundle" in COMPOSE["services"]["opa"]["command"]
    assert "postgresql://" in " ".join(COMPOSE["services"]["mlflow"]["command"])


@pytest.mark.parametrize("service", GATEWAYS)
def test_each_compose_gateway_passes_production_mode_and_points_at_its_sibling_services(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in [k for k in os.environ if k.startswith("CASTELLAN_")]:
        monkeypatch.delenv(key)
    for key, value in _environment(service).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CASTELLAN_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.environment == "production"
    assert enforce_production(settings) == []  # nothing unsafe, nothing overridden
    assert settings.audit.chain_key_file == Path("/run/secrets/audit-chain-key")  # a secret, not the volume
    assert "audit-chain-key" in COMPOSE["secrets"]
    hosts = {
        urlparse(settings.metering.redis_url).hostname,
        urlparse(settings.policy.opa_url).hostname,
        urlparse(settings.audit.mlflow_tracking_uri).hostname,
    }
    assert hosts <= set(COMPOSE["services"]), hosts
    assert settings.metering.backend == "redis"
    assert settings.policy.engine == "opa"
    assert not settings.policy.opa_push  # OPA loads the bundle itself
    assert settings.server.stateless  # no sticky sessions needed behind a load balancer
    # bubblewrap needs user namespaces, which Docker's default seccomp profile refuses; production refuses
    # to fall back silently, so the service must allow them (or choose tools.sandbox = "rlimits")
    assert "seccomp=unconfined" in COMPOSE["services"][service].get("security_opt", []) or (
        settings.tools.sandbox == "rlimits"
    )
    volumes: list[Any] = COMPOSE["services"][service]["volumes"]
    assert any(str(v).endswith(":/data") for v in volumes), "the outbox must live on a volume"


def test_the_image_runs_production_mode_with_a_data_volume_and_a_health_check_on_its_port() -> None:
    assert "CASTELLAN_ENVIRONMENT=production" in DOCKERFILE
    assert 'VOLUME ["/data"]' in DOCKERFILE
    health = next(line for line in DOCKERFILE.splitlines() if line.strip().startswith('CMD ["python"'))
    assert "CASTELLAN_SERVER__PORT" in health
    for extra in ("--extra databricks", "--extra redis"):
        assert DOCKERFILE.count(extra) == 2  # the dependency layer and the project layer
    assert "COPY agent_client" in DOCKERFILE  # castellan-agent, an entry point of the package, works
    # the embedded engine's exact evaluator, built from the same pinned Go module as scripts/build-opa-library
    assert "-buildmode=c-shared" in DOCKERFILE
    assert "/app/.cache/opa-library/libcastellan_opa.so" in DOCKERFILE
