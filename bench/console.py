"""Console pages on 100,000 audited calls: each page's answer time through a real gateway process
(HTTP on loopback, signed in), against the baseline in the same run: the same filters through the
outbox's own JSON search (`/admin/audit`, server/audit/search.py). Also the console index's build
from cold and the full chain verification. A shadow policy decided 60% of the calls (5% of those
otherwise), and the gateway fronts the conformance fixture server, so the catalog lists resources and
prompts. Writes bench/results/console.{json,md}.

    .venv/bin/python -m bench.console [--calls 100000] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.stats import percentile
from server.audit.chain import GENESIS, record_mac
from server.audit.keys import chain_key_for
from server.audit.outbox import SqliteOutbox
from server.auth.devkeys import mint_dev_token
from server.settings import Settings
from tests.gateway_process import GatewayProcess, free_port, run_gateway

RESULTS = Path(__file__).parent / "results"
AGENTS = [f"agent-{i:02d}" for i in range(50)]
TOOLS = ["echo", "sql.query", "docs.search", "clock.now", "main.tools.apply_discount",
         *(f"crm.tool_{i}" for i in range(20))]  # fmt: skip
GROUPS = ["analysts", "finance", "ops", "support", "admins"]
REASONS = [
    "policy: destructive tools need the admins group",
    "grants: EXECUTE missing on main.tools.apply_discount",
    "admit: token budget: 2000000 of 2000000 tokens per day used",
    "policy: sql.query may not read main.hr",
]
DAY = 86_400.0


def seed(data_dir: Path, calls: int, seed_value: int = 11) -> dict[str, Any]:
    """`calls` calls over the last 7 days written as the outbox writes them (keyed MAC chain, the same
    record shape), directly in one transaction so the timestamps can spread over days."""
    settings = Settings(data_dir=data_dir)
    key = chain_key_for(settings, create=True)
    asyncio.run(SqliteOutbox(data_dir / "audit.db", key=key).close())  # the schema and guards, as the gateway has them
    rng = random.Random(seed_value)
    conn = sqlite3.connect(data_dir / "audit.db", isolation_level=None)
    conn.execute("BEGIN")
    prev, seq, now = GENESIS, 0, time.time()
    instance = uuid.uuid4().hex[:16]
    sample: dict[str, Any] = {}
    for i in range(calls):
        ts = now - 7 * DAY + i * (7 * DAY / calls)
        call_id = uuid.uuid4().hex
        agent = rng.choice(AGENTS)
        deny = rng.random() < 0.15
        reason = rng.choice(REASONS)
        stage = reason.split(":")[0] if deny else None
        decision = {
            "call_id": call_id, "request_id": uuid.uuid4().hex, "client": {"name": "bench", "version": "1"},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts)), "action": "call",
            "agent_id": agent, "subject": f"{agent}@example.com", "issuer": "castellan-dev",
            "groups": rng.sample(GROUPS, rng.randint(1, 2)), "tool": rng.choice(TOOLS),
            "securable": "main.tools.echo", "upstream": None,
            "arguments": {"text": f"call {i} " + "x" * rng.randint(20, 400)},
            "run_id": f"run-{i // 12}", "run_depth": i % 12, "traceparent": None,
            "decision": "deny" if deny else "allow", "stage": stage, "code": "denied" if deny else None,
            "reasons": [reason] if deny else [], "policy_version": f"sha256:{i // 25_000:04x}",
            "policy_engine": "embedded", "obligations": {}, "grants": ["EXECUTE"], "grants_missing": [],
            "timings_ms": {"authenticate": 0.05, "resolve": 0.01, "admit": 0.4, "grants": 0.03, "policy": 0.2},
        }  # fmt: skip
        shadow = None
        if (not deny or stage == "policy") and rng.random() < 0.6:  # the shadow decides where policy does
            differs = rng.random() < 0.05
            shadow = {"allow": deny == differs, "reasons": ["candidate: retired"] if differs and not deny else [],
                      "obligations": {}, "policy_version": f"sha256:c{i // 50_000:03x}", "differs": differs,
                      "change": ("deny_to_allow" if deny else "allow_to_deny") if differs else None}  # fmt: skip
            if deny:
                decision["shadow"] = shadow
        rows = [("decision", ts, decision)]
        if not deny:
            rows.append(("outcome", ts + 0.02, {
                "call_id": call_id, "is_error": rng.random() < 0.03, "error": None,
                "result_preview": "result " + "y" * rng.randint(10, 300), "result_chars": 300,
                "tokens_in": rng.randint(10, 400), "tokens_out": rng.randint(10, 800), "latency_ms": 3.2,
                "timings_ms": {**decision["timings_ms"], "invoke": 2.5, "charge": 0.2}, "flags": [],
                "injection_markers": [], **({"shadow": shadow} if shadow else {}),
            }))  # fmt: skip
        for kind, when, record in rows:
            seq += 1
            body = json.dumps(record, separators=(",", ":"))
            digest = record_mac(key, prev, seq, call_id, kind, when, body, instance)
            conn.execute(
                "INSERT INTO outbox (seq, call_id, kind, ts, record, prev_hash, hash, key_id, instance, shipped_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, call_id, kind, when, body, prev, digest, key.key_id, instance, when + 1),
            )
            prev = digest
        if deny and agent == "agent-07" and "call_id" not in sample:
            sample = {"call_id": call_id, "run_id": decision["run_id"]}
    conn.execute("COMMIT")
    conn.close()
    return {"records": seq, **sample}


async def timed(session: aiohttp.ClientSession, url: str, requests: int, **kwargs: Any) -> dict[str, Any]:
    async def one() -> float:
        started = time.perf_counter()
        async with session.get(url, **kwargs) as resp:
            await resp.read()
            assert resp.status == 200, (url, resp.status)
        return time.perf_counter() - started

    await one()  # warm: the first answer after a change catches the index up
    samples = [await one() for _ in range(requests)]
    return {"p50_ms": percentile(samples, 0.5) * 1e3, "p95_ms": percentile(samples, 0.95) * 1e3,
            "max_ms": max(samples) * 1e3}  # fmt: skip


async def sign_in(session: aiohttp.ClientSession, gw: GatewayProcess) -> None:
    token = mint_dev_token(gw.data_dir, agent="bench-auditor", issuer=gw.issuer, audience=gw.mcp_url,
                           scopes=["castellan:audit", "castellan:admin"])  # fmt: skip
    async with session.get(f"{gw.base_url}/console/sign-in") as resp:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert csrf
    async with session.post(f"{gw.base_url}/console/sign-in", data={"token": token, "csrf": csrf.group(1)},
                            headers={"origin": gw.base_url}, allow_redirects=False) as resp:  # fmt: skip
        assert resp.status == 303, await resp.text()


async def measure(gw: GatewayProcess, sample: dict[str, Any], requests: int) -> dict[str, Any]:
    base = gw.base_url
    admin = mint_dev_token(gw.data_dir, agent="bench-admin", issuer=gw.issuer, audience=gw.mcp_url,
                           scopes=["castellan:admin"])  # fmt: skip
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        await sign_in(session, gw)
        started = time.perf_counter()
        while True:  # the index builds from cold in the background after the first page
            async with session.get(f"{base}/console/audit") as resp:
                if "Indexing the audit log" not in await resp.text():
                    break
            await asyncio.sleep(0.2)
        index_build = time.perf_counter() - started
        since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 3 * DAY))
        until = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() - 2 * DAY))
        filters = {
            "no filter": {},
            "one agent's denials": {"agent": "agent-07", "decision": "deny"},
            "no match (agent)": {"agent": "nobody"},
            "group and tool": {"group": "finance", "tool": "sql.query"},
            "stage": {"stage": "grants"},
            "reason text": {"reason": "token budget"},
            "time range": {"since": since, "until": until},
            "shadow disagreements": {"shadow_diff": "1"},
        }
        pages: dict[str, Any] = {}
        for name, params in filters.items():
            pages[f"audit: {name}"] = await timed(session, f"{base}/console/audit", requests, params=params)
        pages["call record"] = await timed(session, f"{base}/console/audit/calls/{sample['call_id']}", requests)
        pages["run timeline"] = await timed(session, f"{base}/console/audit/runs/{sample['run_id']}", requests)
        pages["chain page"] = await timed(session, f"{base}/console/audit/chain", requests)
        for window in ("24h", "7d", "30d"):
            pages[f"charts {window}"] = await timed(session, f"{base}/console/charts", requests,
                                                    params={"window": window})  # fmt: skip
        pages["catalog"] = await timed(session, f"{base}/console/catalog", requests)
        pages["catalog tool"] = await timed(session, f"{base}/console/catalog/tools/echo", requests)
        pages["catalog resource"] = await timed(session, f"{base}/console/catalog/resources/fixture.static-text",
                                                requests)  # fmt: skip
        pages["catalog prompt"] = await timed(
            session, f"{base}/console/catalog/prompts/fixture.test_prompt_with_arguments", requests
        )
        started = time.perf_counter()
        async with session.get(f"{base}/console/audit/chain/verify") as resp:
            verified = "Intact" in await resp.text()
        verify_s = time.perf_counter() - started

        baseline: dict[str, Any] = {}
        headers = {"authorization": f"Bearer {admin}"}
        for name in (
            "no filter",
            "one agent's denials",
            "no match (agent)",
            "group and tool",
            "reason text",
            "shadow disagreements",
        ):
            params = {k: ("true" if k == "shadow_diff" else v) for k, v in filters[name].items()} | {"limit": "50"}
            baseline[f"audit: {name}"] = await timed(session, f"{base}/admin/audit", max(5, requests // 3),
                                                     params=params, headers=headers)  # fmt: skip
        floor = await timed(session, f"{base}/healthz", requests)
    return {"index_build_s": index_build, "pages": pages, "baseline_outbox_search": baseline, "healthz": floor,
            "chain_verify_s": verify_s, "chain_intact": verified}  # fmt: skip


def write_results(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "console.json").write_text(json.dumps(result, indent=2) + "\n")
    pages, base = result["pages"], result["baseline_outbox_search"]
    lines = [
        "# Console: page answer times on 100,000 audited calls",
        "",
        f"{result['calls']:,} calls ({result['records']:,} outbox records, 7 days, 50 agents, 25 tools, 15% denied)"
        f" served by a real gateway process; each page {result['requests']} times after one warm-up, signed in,"
        f" over HTTP on loopback. Load average (1 min) at the start: {result['load']}, at the end:"
        f" {result.get('load_end', '?')} (2 cores shared). A shadow policy decided 60% of the calls; the catalog"
        " lists the conformance fixture server's resources and prompts. Target: every page under 300 ms.",
        "",
        "| page | p50 ms | p95 ms | max ms | baseline: outbox JSON search p50 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in pages.items():
        b = base.get(name)
        lines.append(f"| {name} | {t['p50_ms']:.1f} | {t['p95_ms']:.1f} | {t['max_ms']:.1f} | "
                     f"{b['p50_ms']:.1f} |" if b else f"| {name} | {t['p50_ms']:.1f} | {t['p95_ms']:.1f} | "
                     f"{t['max_ms']:.1f} | |")  # fmt: skip
    lines += [
        f"| /healthz (HTTP floor) | {result['healthz']['p50_ms']:.1f} | {result['healthz']['p95_ms']:.1f} | "
        f"{result['healthz']['max_ms']:.1f} | |",
        "",
        f"- The console index built from cold (first page to caught up): {result['index_build_s']:.1f} s,"
        " in the background; pages answered meanwhile, saying how far it had read.",
        f"- Full chain verification (every MAC recomputed, checked against the checkpoints): "
        f"{result['chain_verify_s']:.1f} s, {'intact' if result['chain_intact'] else 'NOT intact'}. It is loaded"
        " into the chain page after the page itself, not part of the page's answer.",
        f"- Slowest page p95: {max(t['p95_ms'] for t in pages.values()):.1f} ms.",
    ]
    (RESULTS / "console.md").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """The conformance fixture server (resources, a template, prompts) on a free port, for the catalog."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.fixtures.conformance_server", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=0.5)
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="castellan-bench-console-") as tmp:
        data_dir = Path(tmp) / "gw"
        data_dir.mkdir()
        started = time.perf_counter()
        seeded = seed(data_dir, args.calls)
        print(f"seeded {seeded['records']} records in {time.perf_counter() - started:.1f} s")
        load = Path("/proc/loadavg").read_text().split()[0]
        with upstream() as url:
            env = {"CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
                   "CASTELLAN_UPSTREAMS": json.dumps([{"name": "fixture", "url": url}])}  # fmt: skip
            with run_gateway(data_dir, env, timeout=120) as gw:
                result = asyncio.run(measure(gw, seeded, args.requests))
        load_end = Path("/proc/loadavg").read_text().split()[0]
    result.update(calls=args.calls, records=seeded["records"], requests=args.requests, load=load, load_end=load_end)
    write_results(result)
    print((RESULTS / "console.md").read_text())


if __name__ == "__main__":
    main()
