"""The official MCP conformance suite (@modelcontextprotocol/conformance 0.2.0-alpha.12) against the
gateway, with its fixture tools served by an upstream `mcp` SDK server behind the gateway and governed
like any other tool. Runs the active 2025-11-25 suite and the 2026-07-28 requirement set; the
expected failures, each with its reason, are in tests/conformance/expected-failures.yml.

The suite cannot send a bearer token, so a loopback proxy (tests/conformance/auth_proxy.py) adds one.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.settings import REPO_ROOT
from tests.e2e.conftest import E2E
from tests.gateway_process import GatewayProcess, free_port, run_cli, run_gateway
from tests.mcp_upstream import process, wait_port

pytestmark = pytest.mark.e2e
CONFORMANCE = E2E / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
EXPECTED = REPO_ROOT / "tests" / "conformance" / "expected-failures.yml"


@pytest.fixture(scope="module")
def proxied_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    root = tmp_path_factory.mktemp("conformance")
    upstream, proxy = free_port(), free_port()
    upstreams = [{"name": "conformance", "url": f"http://127.0.0.1:{upstream}/mcp", "prefix": ""}]
    with process("-m", "tests.fixtures.conformance_server", "--port", str(upstream)):
        wait_port(upstream)
        # The suite repeats identical calls quickly: the per-agent call limits are lifted for it
        # (they have tests of their own); grants, policy and audit stay on.
        limits = {"calls_per_minute": 0, "max_repeats": 0, "max_run_calls": 0, "concurrent_calls": 0,
                  "max_identical_calls": 0, "max_calls_per_tool": 0}  # fmt: skip
        # The upstream is re-listed often, so a list change it makes (server-stateless's triggers) reaches
        # a listening client within the suite's wait.
        env = {"CASTELLAN_UPSTREAMS": json.dumps(upstreams), "CASTELLAN_TOOLS__UPSTREAM_REFRESH_SECONDS": "0.2"}
        env |= {f"CASTELLAN_METERING__LIMITS__{k.upper()}": str(v) for k, v in limits.items()}
        with run_gateway(root / "gw", env, timeout=120) as gw:  # a loaded CI machine starts it slowly
            token_file = root / "token"
            token_file.write_text(gw.token("conformance-suite", ["admins"]))
            with process(
                "-m", "tests.conformance.auth_proxy", "--listen", str(proxy), "--target", gw.base_url,
                "--token-file", str(token_file),
            ):  # fmt: skip
                wait_port(proxy)
                yield gw, f"http://127.0.0.1:{proxy}/mcp"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("selection", [["--spec-version", "2025-11-25"], ["--requirements", "2026-07-28"]], ids=str)
def test_conformance_suite(
    node: Path, proxied_gateway: tuple[GatewayProcess, str], selection: list[str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    gw, url = proxied_gateway
    done = subprocess.run(
        [str(node), str(CONFORMANCE), "server", "--url", url, *selection,
         "--expected-failures", str(EXPECTED), "-o", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=850, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    total = re.search(r"Total: (\d+) passed, (\d+) failed", output)
    summary = output[output.find("=== SUMMARY") :] if "=== SUMMARY" in output else output[-4000:]
    with capsys.disabled():
        print(f"\nMCP conformance {' '.join(selection)}: {total.group(0) if total else 'no total'}")
    assert total is not None, output[-4000:]
    assert done.returncode == 0, f"unexpected failures or stale expected failures:\n{summary}"
    # The tasks extension's scenarios are not scored by the suite's exit code: each must pass all the same.
    for checks in (tmp_path / "results").glob("server-tasks-*/checks.json"):
        failed = [c["id"] for c in json.loads(checks.read_text()) if c["status"] == "FAILURE"]
        assert not failed, f"{checks.parent.name}: {failed}"
    # Every governed call the suite made went through the pipeline and is in the audit log.
    audit = run_cli(gw, "audit", "search", "--agent", "conformance-suite", "--tool", "test_image_content",
                    "--format", "jsonl", timeout=60)  # fmt: skip
    assert any(json.loads(line)["decision"] == "allow" for line in audit.stdout.splitlines())
