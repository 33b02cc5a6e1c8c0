"""The gateway deciding with a real OPA: outages deny and heal, hot reload refuses broken edits,
`auto` manages (and revives) its own OPA, and a stalled OPA is neither waited on nor hammered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.load import call_body, call_headers
from server.settings import REPO_ROOT
from tests.gateway_process import GatewayProcess, run_gateway
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


NO_LIMITS = {
    "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
    "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
}


async def calling(gw: GatewayProcess, token: str, stop: asyncio.Event, workers: int = 8) -> list[dict[str, Any]]:
    """`workers` clients calling echo in a loop until `stop`: each result with when it was sent and took."""
    results: list[dict[str, Any]] = []

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            sent = time.monotonic()
            body = call_body("echo", {"text": f"{n}-{i}"}, i)
            async with session.post(gw.mcp_url, data=body, headers=call_headers("echo", token)) as resp:
                result = (await resp.json())["result"]
            results.append({"sent": sent, "took": time.monotonic() - sent, **result})

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, n) for n in range(workers)))
    return results


async def test_a_stalled_then_killed_opa_is_not_hammered_and_the_gateway_recovers(tmp_path: Path) -> None:
    """SIGSTOP (stall), SIGCONT, SIGKILL and a restart of a real OPA while 8 clients call, with counts."""
    timeout = 1.0
    with run_opa() as opa:
        env = {
            "CASTELLAN_POLICY__ENGINE": "opa",
            "CASTELLAN_POLICY__OPA_URL": opa.url,
            "CASTELLAN_POLICY__TIMEOUT_SECONDS": str(timeout),
            **NO_LIMITS,
        }
        with run_gateway(tmp_path / "gw", env, timeout=60) as gw:  # start-up on a loaded 2-core box
            stop = asyncio.Event()
            load = asyncio.create_task(calling(gw, gw.token("stall-bot", ["analysts"]), stop))
            marks = {"start": time.monotonic()}
            await asyncio.sleep(2.0)
            marks["stopped"] = time.monotonic()
            opa.process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(6.0)
            marks["continued"] = time.monotonic()
            waited = gw.log().count('"event": "opa_unavailable"')  # calls that waited on the stalled OPA
            opa.process.send_signal(signal.SIGCONT)
            await asyncio.sleep(3.0)
            marks["killed"] = time.monotonic()
            opa.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(opa.process.wait)
            await asyncio.sleep(2.0)
            marks["restarted"] = time.monotonic()
            await asyncio.to_thread(opa.restart)  # a fresh OPA with no policy: the gateway pushes it again
            await asyncio.sleep(4.0)
            marks["end"] = time.monotonic()
            stop.set()
            results = await load
            async with aiohttp.ClientSession() as session, session.get(f"{gw.base_url}/metrics") as resp:
                metrics = await resp.text()
            log = gw.log()
            with contextlib.closing(sqlite3.connect(gw.data_dir / "audit.db")) as db:
                records = [json.loads(r[0]) for r in db.execute("SELECT record FROM outbox WHERE kind = 'decision'")]

    def phase(start: str, end: str, settle: float) -> list[dict[str, Any]]:
        """Calls sent `settle` seconds after `start` that were answered before `end`."""
        return [r for r in results if marks[start] + settle < r["sent"] and r["sent"] + r["took"] < marks[end] - 0.05]

    def denied(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rs if r["isError"] and deny_body(r)["reasons"] == ["policy engine unavailable"]]

    phases = {
        "healthy": phase("start", "stopped", 0.0),
        "stalled (SIGSTOP)": phase("stopped", "continued", timeout + 0.5),
        "continued (SIGCONT)": phase("continued", "killed", 2.5),
        "killed": phase("killed", "restarted", 0.2),
        "restarted": phase("restarted", "end", 3.0),
    }
    print(f"\n{'phase':<22}{'calls':>7}{'allowed':>9}{'denied':>8}{'calls/s':>9}{'max wait s':>12}")
    for name, rs in phases.items():
        span = max(r["sent"] for r in rs) - min(r["sent"] for r in rs) if len(rs) > 1 else 1.0
        allowed = sum(not r["isError"] for r in rs)
        longest = max(r["took"] for r in rs)
        print(f"{name:<22}{len(rs):>7}{allowed:>9}{len(denied(rs)):>8}{len(rs) / span:>9.0f}{longest:>12.2f}")
    repushes = re.search(r"^castellan_policy_engine_repushes_total (\S+)$", metrics, re.MULTILINE)
    assert repushes is not None
    print(f"calls that waited on the stalled OPA: {waited}; re-pushes after the restart: {repushes.group(1)}")

    for name in ("healthy", "continued (SIGCONT)", "restarted"):
        assert phases[name], name
        assert all(not r["isError"] for r in phases[name]), name
    for name in ("stalled (SIGSTOP)", "killed"):
        assert phases[name], name
        assert denied(phases[name]) == phases[name], name
    # The breaker: while OPA stalled, a handful of calls waited (those in flight, then one trial per
    # cooldown); the rest were denied without touching OPA.
    assert '"event": "policy_engine_circuit_open"' in log
    assert waited <= 8 + 3 + 8  # in flight at the stall + the threshold + trials (one per >= 1 s cooldown)
    assert len(phases["stalled (SIGSTOP)"]) > 10 * waited
    # One re-push served every caller after the restart, however many were waiting.
    assert float(repushes.group(1)) == 1.0
    # A decision never waited longer than the timeout (a bound, with slack for a loaded event loop).
    policy_ms = [r["timings_ms"].get("policy", 0.0) for r in records]
    assert max(policy_ms) < timeout * 1000 * 2, max(policy_ms)
    assert len(records) == len(results)  # every call audited
