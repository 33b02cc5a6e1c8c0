"""The OPA library inside a Python process that forks and spawns: the catalog functions' forkserver
never maps it (it is loaded on first use, not at import), a forkserver child started after the
library is loaded runs, and subprocesses start; Go's runtime does not get in the way of either."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.policy import inprocess_opa
from server.settings import REPO_ROOT

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import concurrent.futures, json, multiprocessing, os, subprocess, sys
    from server.policy import inprocess_opa, embedded  # importing loads no Go runtime
    from server.policy.bundle import PolicyBundle
    from server.settings import REPO_ROOT

    def child_maps(_):
        return os.getpid(), "libcastellan_opa" in open("/proc/self/maps").read()

    if __name__ == "__main__":
        assert "libcastellan_opa" not in open("/proc/self/maps").read()
        bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
        policy = inprocess_opa.CompiledPolicy(bundle, "data.system.log.mask")
        assert "libcastellan_opa" in open("/proc/self/maps").read()
        ctx = multiprocessing.get_context("forkserver")
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
            results = list(pool.map(child_maps, range(4)))
        assert all(not mapped for _, mapped in results), results
        assert subprocess.run(["true"]).returncode == 0
        ok, value = policy.evaluate(json.dumps({"input": {"arguments": {"Password": 1}}}))
        assert ok and value == ["/input/arguments/Password"], value
        print("ok", len(results))
    """
)


def test_forkserver_children_and_subprocesses_beside_the_library(tmp_path: Path) -> None:
    if not inprocess_opa.available():
        pytest.fail("the OPA library is not built: run scripts/build-opa-library (needs Go)")
    script = tmp_path / "fork_beside_go.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok 4"


def test_the_library_go_tests_pass() -> None:
    """The library's own Go tests, among them input_test.go: the input parser gives the values (and
    decisions) of the parse it replaced, on ~60,000 generated, malformed and odd documents."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain: the library is not built either")
    done = subprocess.run(
        [go, "test", "-count=1", "./..."],
        cwd=REPO_ROOT / "server" / "policy" / "golib",
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
