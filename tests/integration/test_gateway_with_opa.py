"""The gateway deciding with a real OPA: outages deny and heal, hot reload refuses broken edits,
and `auto` manages (and revives) its own OPA."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from server.settings import REPO_ROOT
from server.testing import run_gateway
from tests.integration.conftest import deny_body, raw_call
from tests.opa import opa_binary, run_opa

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def eventually(check: Callable[[], Awaitable[None]], within: float = 10.0) -> None:
    """Retry `check` until it stops failing its assertions, for at most `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await check()
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_opa_down_denies_and_recovers_without_a_restart(tmp_path: Path) -> None:
    with run_opa() as opa:
        env = {"CASTELLAN_POLICY__ENGINE": "opa", "CASTELLAN_POLICY__OPA_URL": opa.url}
        with run_gateway(tmp_path / "gw", env) as gw:
            token = gw.token("opa-bot", ["analysts"])
            assert (await raw_call(gw, token, "echo", {"text": "before"}))["isError"] is False
            opa.stop()
            body = deny_body(await raw_call(gw, token, "echo", {"text": "during"}))
            assert (body["stage"], body["reasons"]) == ("policy", ["policy engine unavailable"])
            opa.restart()  # a fresh OPA, with no policy: the gateway pushes it again

            async def allowed_again() -> None:
                assert (await raw_call(gw, token, "echo", {"text": "after"}))["isError"] is False

            await eventually(allowed_again)
            assert "opa_unavailable" in gw.log()


async def test_a_policy_edit_is_hot_reloaded_and_a_broken_one_refused(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    env = {
        "CASTELLAN_POLICY__ENGINE": "embedded",
        "CASTELLAN_POLICY__PATH": str(policies),
        "CASTELLAN_POLICY__RELOAD_INTERVAL_SECONDS": "0.2",
    }
    with run_gateway(tmp_path / "gw", env) as gw:
        token = gw.token("reload-bot", ["analysts"])
        assert (await raw_call(gw, token, "echo", {"text": "four"}))["isError"] is False
        data = policies / "castellan" / "config" / "data.json"
        data.write_text(data.read_text().replace('["drop table"]', '["drop table", "four"]'))

        async def tightened() -> None:
            body = deny_body(await raw_call(gw, token, "echo", {"text": "four"}))
            assert body["reasons"] == ['argument text contains blocked text "four"']

        await eventually(tightened)
        rego = policies / "castellan" / "gateway.rego"
        rego.write_text(rego.read_text() + "\nthis is not rego {\n")

        async def refused() -> None:
            assert "policy_edit_refused" in gw.log()

        await eventually(refused)
        # the last good policy ("four" blocked) still decides
        await tightened()
        assert (await raw_call(gw, token, "echo", {"text": "ok"}))["isError"] is False


async def test_auto_manages_a_local_opa_and_revives_it(tmp_path: Path) -> None:
    env = {"CASTELLAN_POLICY__ENGINE": "auto", "CASTELLAN_POLICY__OPA_BINARY": opa_binary()}
    with run_gateway(tmp_path / "gw", env) as gw:
        log = gw.log()
        assert '"policy_engine": "opa"' in log
        url = re.search(r'"url": "(http://127\.0\.0\.1:\d+)", "pid": (\d+), "event": "opa_started"', log)
        assert url is not None, log
        token = gw.token("auto-bot", ["analysts"])
        assert (await raw_call(gw, token, "echo", {"text": "managed"}))["isError"] is False
        os.kill(int(url.group(2)), signal.SIGKILL)
        body = deny_body(await raw_call(gw, token, "echo", {"text": "opa gone"}))
        assert body["reasons"] == ["policy engine unavailable"]

        async def revived() -> None:
            assert (await raw_call(gw, token, "echo", {"text": "revived"}))["isError"] is False

        await eventually(revived)
        assert "opa_restarting" in gw.log()
    leftover = await asyncio.to_thread(
        subprocess.run, ["pgrep", "-f", url.group(1).split("//")[1]], capture_output=True, check=False
    )
    assert leftover.stdout == b"", "the managed OPA outlived the gateway"
