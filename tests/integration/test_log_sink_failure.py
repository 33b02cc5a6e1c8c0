"""A full disk under the log file changes no decision and no response (issue: denials became -32603)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_process import GatewayProcess, free_port, gateway_env, run_gateway
from tests.integration.conftest import raw_call
from tests.integration.test_audit_shipping import metric

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

CALLS: list[tuple[str, dict[str, Any]]] = [
    ("echo", {"text": "hello"}),  # allowed
    ("demo.reset", {}),  # denied by policy: destructive
    ("echo", {"text": "please DROP TABLE users"}),  # denied by policy: blocked text
    ("echo", {"text": 42}),  # refused: invalid arguments
    ("no.such.tool", {}),  # refused: unknown tool
    ("clock.now", {}),  # allowed
]


@contextlib.contextmanager
def gateway_logging_to_a_full_disk(data_dir: Path) -> Iterator[GatewayProcess]:
    """`castellan serve` whose stdout and stderr are /dev/full: every log write fails with ENOSPC."""
    port = free_port()
    data_dir.mkdir(parents=True)
    with open("/dev/full", "wb") as full:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            env={**gateway_env(data_dir, port)},
            stdout=full,
            stderr=full,
        )
    gateway = GatewayProcess(data_dir=data_dir, port=port, process=process, log_path=Path("/dev/null"))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the gateway exited with {process.returncode} on a full disk"
            assert time.monotonic() < deadline, "the gateway did not become ready on a full disk"
            try:
                with urllib.request.urlopen(f"{gateway.base_url}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield gateway
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def comparable(result: dict[str, Any]) -> Any:
    """What the agent is told, without what differs from call to call (ids, times)."""
    content = result.get("content") or [{}]
    text = content[0].get("text", "")
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k in ("decision", "stage", "reasons", "code")}
    elif result.get("isError") is not True and isinstance(body, str) and "T" in body and ":" in body:
        body = "<a time>"  # clock.now
    return {"isError": result.get("isError", False), "body": body}


async def test_responses_are_the_same_when_the_log_file_is_on_a_full_disk(tmp_path: Path) -> None:
    with run_gateway(tmp_path / "normal") as normal:
        token = normal.token("bot", ["analysts"])
        expected = [comparable(await raw_call(normal, token, tool, args)) for tool, args in CALLS]
    assert [r["isError"] for r in expected] == [False, True, True, True, True, False]

    with gateway_logging_to_a_full_disk(tmp_path / "full") as full:
        token = full.token("bot", ["analysts"])
        for _ in range(3):
            got = [comparable(await raw_call(full, token, tool, args)) for tool, args in CALLS]
            assert got == expected
        assert await metric(full, "castellan_log_lines_dropped") >= len(CALLS) * 3
