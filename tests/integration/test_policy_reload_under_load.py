"""Policy edits under load: a policy file rewritten in chunks, with pauses, while 8 clients call in a
loop. From the audit log: every decision names a complete version (never a half-written file) and
decided as that version does, and no call allowed during an edit is one that both the version before
and the version after deny. Then an ill-typed edit is refused before it decides anything, visibly.
With the embedded engine and with a real OPA server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.load import call_body, call_headers
from server.policy.bundle import PolicyBundle
from server.settings import REPO_ROOT
from tests.gateway_process import GatewayProcess, run_gateway
from tests.opa import run_opa

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
WORKERS = 8
TEXTS = ("alpha", "beta", "gamma", "plain")


def rule(word: str) -> str:
    condition = f'\tinput.action == "call"\n\tinput.arguments.text == "{word}"'
    return f'\ndeny contains "{word} is blocked" if {{\n{condition}\n}}\n'


BASE = (REPO_ROOT / "policies" / "castellan" / "gateway.rego").read_text()
HALF = len(BASE) // 2
# Each version's gateway.rego as chunks written with pauses. Every prefix that ends on a chunk
# boundary after BASE is valid Rego missing the `alpha` rule, which every version has: loaded
# half-way, it would allow "alpha", which the versions before and after both deny.
EDITS = {
    "v0": [BASE, rule("alpha")],
    "v1": [BASE[:HALF], BASE[HALF:], rule("beta"), rule("alpha")],
    "v2": [BASE[:HALF], BASE[HALF:], rule("gamma"), rule("beta"), rule("alpha")],
}
DENIES = {"v0": {"alpha"}, "v1": {"alpha", "beta"}, "v2": {"alpha", "beta", "gamma"}}


def version_of(policies: Path, name: str, scratch: Path) -> str:
    shutil.copytree(policies, scratch / name)
    (scratch / name / "castellan" / "gateway.rego").write_text("".join(EDITS[name]))
    return PolicyBundle.from_directory(scratch / name).version


async def write_in_chunks(path: Path, chunks: list[str], pause: float = 0.2) -> None:
    with path.open("w") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            await asyncio.sleep(pause)


async def clients(gw: GatewayProcess, token: str, stop: asyncio.Event) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            text = TEXTS[(n + i) % len(TEXTS)]
            i += 1
            body = call_body("echo", {"text": text}, i)
            async with session.post(gw.mcp_url, data=body, headers=call_headers("echo", token)) as resp:
                assert resp.status == 200, await resp.text()
                results.append({"text": text, **(await resp.json())["result"]})

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, n) for n in range(WORKERS)))
    return results


async def readiness(gw: GatewayProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{gw.base_url}/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        body["http_status"] = resp.status
        return body


async def until(gw: GatewayProcess, check: Any, within: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        body = await readiness(gw)
        if check(body):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


def audited_calls(gw: GatewayProcess) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(gw.data_dir / "audit.db")) as db:
        rows = [json.loads(r[0]) for r in db.execute("SELECT record FROM outbox WHERE kind = 'decision' ORDER BY seq")]
    return [r for r in rows if r["action"] == "call" and r["tool"] == "echo"]


@contextlib.contextmanager
def engine_env(engine: str) -> Iterator[dict[str, str]]:
    if engine == "embedded":
        yield {"CASTELLAN_POLICY__ENGINE": "embedded"}
        return
    with run_opa() as opa:
        yield {"CASTELLAN_POLICY__ENGINE": "opa", "CASTELLAN_POLICY__OPA_URL": opa.url}


@pytest.mark.parametrize("engine", ["embedded", "opa"])
async def test_chunked_policy_edits_under_load_decide_only_as_complete_versions(tmp_path: Path, engine: str) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    rego = policies / "castellan" / "gateway.rego"
    rego.write_text("".join(EDITS["v0"]))
    versions = {version_of(policies, name, tmp_path / "versions"): name for name in EDITS}
    env = {
        "CASTELLAN_POLICY__PATH": str(policies),
        "CASTELLAN_POLICY__RELOAD_INTERVAL_SECONDS": "0.1",
        "CASTELLAN_POLICY__RELOAD_QUIET_SECONDS": "2.0",  # 10x the pauses between chunks
        "CASTELLAN_POLICY__TIMEOUT_SECONDS": "10",  # a loaded 2-core CI box; the OPA stall test covers timeouts
        "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
        "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
        "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
        "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
        "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
    }
    with (
        engine_env(engine) as engine_settings,
        run_gateway(tmp_path / "gw", {**env, **engine_settings}, timeout=60) as gw,  # start-up on a loaded box
    ):
        stop = asyncio.Event()
        load = asyncio.create_task(clients(gw, gw.token("reload-load", ["analysts"]), stop))
        await asyncio.sleep(1.0)
        for name in ("v1", "v2"):
            await write_in_chunks(rego, EDITS[name])
            await until(gw, lambda body, n=name: versions.get(body["policy"]["version"]) == n)
            await asyncio.sleep(0.5)
        # An ill-typed edit: valid Rego, compiles, but `reasons` would hold a number.
        bad = "".join(EDITS["v2"]) + '\ndeny contains 42 if input.action == "call"\n'
        await write_in_chunks(rego, [bad])
        degraded = await until(gw, lambda body: body["status"] == "degraded")
        await asyncio.sleep(0.5)
        stop.set()
        results = await load
        async with aiohttp.ClientSession() as session, session.get(f"{gw.base_url}/metrics") as resp:
            metrics = await resp.text()
        log = gw.log()
        calls = audited_calls(gw)

    # the refused edit: visible, reasoned, and the last good version still deciding
    assert degraded["http_status"] == 200
    assert versions[degraded["policy"]["version"]] == "v2"
    assert (
        "probe 'plain call': policy decision 'reasons' is not a set of strings"
        in (degraded["policy"]["refused_edit"]["reasons"])
    )
    assert 'castellan_policy_reloads_total{result="loaded"} 2.0' in metrics
    assert 'castellan_policy_reloads_total{result="refused"} 1.0' in metrics
    assert "castellan_policy_edit_refused 1.0" in metrics
    assert '"event": "policy_edit_refused"' in log

    # every audited decision names one of the complete versions, and decided as that version does
    assert len(calls) == len(results)
    named = Counter(versions.get(c["policy_version"], c["policy_version"]) for c in calls)
    assert set(named) == {"v0", "v1", "v2"}, named
    for call in calls:
        text, version = call["arguments"]["text"], versions[call["policy_version"]]
        expected = [f"{text} is blocked"] if text in DENIES[version] else []
        assert (call["decision"], call["reasons"]) == ("deny" if expected else "allow", expected), call
    # no call was allowed that both neighbouring versions deny (alpha: every version; beta: v1 and v2)
    allowed = Counter(r["text"] for r in results if not r["isError"])
    assert allowed["alpha"] == 0
    assert all(r["isError"] for r in results if r["text"] == "alpha")
    print(
        f"\n{engine}: {len(results)} calls by {WORKERS} clients across 2 chunked edits and 1 refused one; "
        f"decisions by version {dict(sorted(named.items()))}; allowed {dict(sorted(allowed.items()))}"
    )
