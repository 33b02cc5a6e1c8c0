"""Production mode as an operator meets it: refused at start-up, `check-config` verdicts, a guarded /metrics."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from joserfc.jwk import ECKey

from tests.gateway_process import GatewayProcess, castellan, free_port, gateway_env, run_gateway

pytestmark = [pytest.mark.integration]


def _castellan(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return castellan(*args, env={**os.environ, **gateway_env(data_dir, free_port()), **env}, timeout=120)


def test_serve_in_production_with_dev_defaults_exits_naming_each_setting(tmp_path: Path) -> None:
    done = _castellan(tmp_path, "serve", CASTELLAN_ENVIRONMENT="production")
    assert done.returncode != 0
    for setting in ("auth.mode", "demo", "auth.max_token_lifetime_seconds", "server.metrics_auth"):
        assert setting in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_warns_first_and_ends_with_a_one_line_verdict(tmp_path: Path) -> None:
    done = _castellan(tmp_path, "check-config")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("warning: ")
    assert lines[-1].startswith("check-config: ok")
    assert any(line.startswith("ok") and "policy" in line for line in lines)


def test_check_config_fails_on_an_unreachable_backend_with_json_for_machines(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    done = _castellan(
        tmp_path, "check-config", "--json", CASTELLAN_POLICY__ENGINE="opa", CASTELLAN_POLICY__OPA_URL=dead
    )
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["verdict"].startswith("check-config: failed")
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed, report


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[GatewayProcess]:
    with run_gateway(
        tmp_path, {"CASTELLAN_SERVER__METRICS_AUTH": "token", "CASTELLAN_AUTH__MAX_TOKEN_LIFETIME_SECONDS": "600"}
    ) as gw:
        yield gw


@pytest.mark.anyio
async def test_metrics_with_token_auth_needs_the_metrics_scope(guarded: GatewayProcess) -> None:
    url = f"{guarded.base_url}/metrics"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as resp:
            assert resp.status == 401
        plain = guarded.token("ops", ttl_seconds=300)
        async with s.get(url, headers={"authorization": f"Bearer {plain}"}) as resp:
            assert resp.status == 403
            assert "castellan:metrics" in await resp.text()
        scoped = guarded.token("ops", scopes=["castellan:metrics"], ttl_seconds=300)
        async with s.get(url, headers={"authorization": f"Bearer {scoped}"}) as resp:
            assert resp.status == 200
            assert "castellan" in await resp.text()


@pytest.mark.anyio
async def test_a_token_living_longer_than_the_bound_is_refused(guarded: GatewayProcess) -> None:
    long_lived = guarded.token("ops", ttl_seconds=3600)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            guarded.mcp_url,
            data=b"{}",
            headers={"authorization": f"Bearer {long_lived}", "content-type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 401
        assert "exceeds the 600s" in resp.headers.get("WWW-Authenticate", "") + await resp.text()


README = Path(__file__).resolve().parents[2] / "README.md"


@contextlib.contextmanager
def _jwks_server(keys: dict[str, object]) -> Iterator[str]:
    """An issuer's JWKS endpoint on a loopback port (the README's issuer is a placeholder host)."""
    body = json.dumps(keys).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/certs"
    finally:
        server.shutdown()


def test_the_readme_production_config_passes_every_check(tmp_path: Path) -> None:
    """The README's production-shaped castellan.toml, as written, starts in production: only the issuer's
    address (a placeholder) and the mounted secret's path are swapped for this machine's. The chain key
    is a binary secret, as `head -c 32 /dev/urandom` writes one."""
    found = re.search(r"A production-shaped `castellan.toml`:\n\n```toml\n(.*?)```", README.read_text(), re.S)
    assert found, "the README's production example is gone"
    config = tmp_path / "castellan.toml"
    config.write_text(found.group(1))
    key = tmp_path / "chain-key"
    key.write_bytes(os.urandom(32))
    issuer_keys = ECKey.generate_key("P-256", parameters={"kid": "k1", "use": "sig"})
    with _jwks_server({"keys": [issuer_keys.as_dict(private=False)]}) as jwks:
        done = _castellan(
            tmp_path / "data",
            "check-config",
            "--json",
            "--config",
            str(config),
            CASTELLAN_AUTH__JWKS_URL=jwks,
            CASTELLAN_AUDIT__CHAIN_KEY_FILE=str(key),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert {c["name"] for c in report["checks"] if c["ok"]} >= {"settings", "identity", "policy", "audit"}, report
    assert "production" in next(c["detail"] for c in report["checks"] if c["name"] == "settings")
