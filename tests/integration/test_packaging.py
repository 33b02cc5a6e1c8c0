"""The built wheel on its own: installed into a clean environment outside the checkout, it serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import REPO_ROOT

pytestmark = [pytest.mark.integration]


def _uv() -> str:
    local = REPO_ROOT / ".cache" / "bootstrap" / "bin" / "uv"
    return str(local) if local.exists() else "uv"


@pytest.mark.timeout(600)
def test_the_wheel_installed_alone_has_its_policies_and_passes_check_config(tmp_path: Path) -> None:
    run = {"capture_output": True, "text": True, "timeout": 420, "check": False}
    built = subprocess.run([_uv(), "build", "--wheel", "-o", str(tmp_path / "dist"), str(REPO_ROOT)], **run)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("castellan-*.whl")
    venv = tmp_path / "venv"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    made = subprocess.run([_uv(), "venv", "-q", "-p", sys.executable, str(venv)], env=env, **run)
    assert made.returncode == 0, made.stderr
    installed = subprocess.run([_uv(), "pip", "install", "-q", "--python", str(venv / "bin/python"), str(wheel)],
                               env=env, **run)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CASTELLAN_", "PYTHONPATH", "VIRTUAL_ENV"))}
    done = subprocess.run(
        [str(venv / "bin/castellan"), "check-config"],
        cwd=elsewhere,
        env={**clean, "CASTELLAN_DATA_DIR": str(elsewhere / "data")},
        **run,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("ok") and " policy: " in line for line in done.stdout.splitlines()), done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("check-config: ok")
    for entry in ("castellan", "castellan-agent"):
        assert (venv / "bin" / entry).exists()
    agent = subprocess.run([str(venv / "bin/castellan-agent"), "--help"], cwd=elsewhere, env=clean, **run)
    assert agent.returncode == 0, agent.stderr


@pytest.mark.timeout(600)
def test_the_images_install_steps_give_both_entry_points_in_a_clean_environment(tmp_path: Path) -> None:
    """What the Dockerfile runs (`uv sync --locked --no-dev` with every backend's extra), outside a container."""
    run = {"capture_output": True, "text": True, "timeout": 420, "check": False}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    sync = next(line for line in dockerfile.splitlines() if "uv sync" in line and "--no-install-project" not in line)
    flags = sync.split("uv sync", 1)[1].split()
    venv = tmp_path / "image-venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never"}
    done = subprocess.run([_uv(), "sync", "-q", *flags, "--python", sys.executable], cwd=REPO_ROOT, env=env, **run)
    assert done.returncode == 0, done.stderr
    for entry in ("castellan", "castellan-agent"):
        helped = subprocess.run([str(venv / "bin" / entry), "--help"], env=env, **run)
        assert helped.returncode == 0, helped.stderr
    imports = "import databricks.sdk, redis, server.grants.databricks, server.metering.redis"
    assert subprocess.run([str(venv / "bin/python"), "-c", imports], env=env, **run).returncode == 0
