"""Castellan beside its peers: the same upstream `echo` tool (bench/direct_server.py) called directly,
through Castellan (its built-in echo, and proxying that upstream, every stage on, shipping on) and
through other MCP gateways and proxies, each installed by this bench into its own environment under
.cache/bench/. Rounds are interleaved across targets, in both protocol eras where a target speaks them;
after every round the target's processes are let go quiet (Castellan's shipper finishes its backlog),
so the next round is not slowed by the last and the CPU a call costs includes the work it leaves
behind. Writes bench/results/peers.{json,md}.

    .venv/bin/python -m bench.peers [--quick] [--calls 600] [--rounds 3] [--only castellan,mcp-proxy]

Peers (a peer that does not install or start here is reported as skipped, with the reason):
- mcp-proxy 0.13 (its own environment: 0.12 does not import beside mcp 2.3), in front of the upstream
  through its own streamable-HTTP client (`mcp-proxy --port P -- mcp-proxy --transport streamablehttp
  URL`: the two-process chain is how it fronts an HTTP server; both processes count as its CPU).
- fastmcp 4.2's `create_proxy`: its default (a backend session per request) and with one connected
  backend client reused by every request.
- IBM mcp-contextforge-gateway 1.0.7 (1.1 needs Python >= 3.12): the upstream registered through its
  admin API (a gateway, then a virtual server holding its echo tool), loopback upstreams allowed,
  generated strong secrets, its rate limits off. 2025 era only.
- litellm[proxy]: the upstream as an `mcp_servers` entry of its config, its aggregate `/mcp/`
  endpoint, the master key as bearer token. 2025 era only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import Era, Sample, drive
from tests.gateway_process import GatewayProcess, free_port, run_gateway, stop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
ENVS = ROOT / ".cache" / "bench"
UV = ROOT / ".cache" / "bootstrap" / "bin" / "uv"
PEER_SERVERS = Path(__file__).parent / "peer_servers"
CONCURRENCY = (1, 16, 64)
TICKS = os.sysconf("SC_CLK_TCK")

# Every stage on, shipping on; the limits that would refuse a load test's calls off.
CASTELLAN_ENV = {
    "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
    "CASTELLAN_METERING__LIMITS__TOKENS_PER_DAY": "0",
    "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
    "CASTELLAN_METERING__LIMITS__CONCURRENT_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
    "CASTELLAN_LOG_LEVEL": "warning",
    "CASTELLAN_AUDIT__SHIP": "true",
}

PEER_PACKAGES: dict[str, list[str]] = {
    "mcp-proxy": ["mcp-proxy==0.13.*"],
    "fastmcp": ["fastmcp==4.2.*"],
    "contextforge": ["mcp-contextforge-gateway==1.0.7"],
    "litellm": ["litellm[proxy]"],
}


# -- processes and their CPU ---------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, user+system CPU ticks) for every process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def root_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by `roots` themselves (without their children)."""
    table = _proc_table()
    return sum(table[r][1] for r in roots if r in table) / TICKS


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by `roots` and all their descendants that are alive."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    stack = [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack += children.get(pid, [])
    return sum(table[p][1] for p in seen) / TICKS


async def quiesce(roots: list[int], limit: float = 60.0) -> None:
    """Wait (at most `limit` seconds) until `roots` use under 3% of a core over half a second: the
    shipper has drained its backlog, a peer has finished its background work."""
    deadline = time.monotonic() + limit
    before = tree_cpu(roots)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = tree_cpu(roots)
        if now - before <= 0.015:
            return
        before = now


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 240.0) -> None:
    """Until `url` answers anything over HTTP (an error status counts: the server is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


# -- peers' environments ------------------------------------------------------------------------------


def install(peer: str) -> Path:
    """The peer's own virtual environment under .cache/bench/, made once (uv; the cache makes it quick)."""
    env = ENVS / peer
    marker = env / ".installed"
    wanted = json.dumps(PEER_PACKAGES[peer])
    if marker.exists() and marker.read_text() == wanted:
        return env
    uv = str(UV) if UV.exists() else shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv not found (run scripts/bootstrap)")
    subprocess.run(
        [uv, "venv", "-q", "--clear", "--python", "3.11", str(env)], check=True, capture_output=True, timeout=300
    )
    done = subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(env / "bin" / "python"), *PEER_PACKAGES[peer]],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"does not install here: {done.stderr.strip()[-400:]}")
    marker.write_text(wanted)
    return env


def version_of(env: Path, dist: str) -> str:
    done = subprocess.run(
        [str(env / "bin" / "python"), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip() or "?"


# -- targets --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    tool: str
    eras: tuple[Era, ...]
    pids: list[int]
    token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    version: str = ""
    note: str = ""


@contextlib.contextmanager
def process(argv: list[str], url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        try:
            wait_http(url, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {log.read_text()[-600:]}") from None
        yield proc.pid
    finally:
        stop(proc)


def start_direct(stack: contextlib.ExitStack, tmp: Path) -> Target:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    pid = stack.enter_context(
        process([sys.executable, "-m", "bench.direct_server", str(port)], url, tmp / "direct.log")
    )
    return Target("direct (mcp SDK server)", url, "echo", ("2026", "2025"), [pid])


def grant_upstream(gw: GatewayProcess) -> None:
    """Lets the bench's `analysts` call the tools of upstream `up` (USE SCHEMA and EXECUTE on its schema)."""
    for statement in ("USE SCHEMA ON SCHEMA main.upstream", "EXECUTE ON SCHEMA main.upstream"):
        subprocess.run(
            [sys.executable, "-m", "server", "grants", "grant", *statement.split(), "TO", "analysts"],
            env=gw.env(),
            check=True,
            capture_output=True,
            timeout=60,
        )


def start_castellan(stack: contextlib.ExitStack, tmp: Path, upstream: str) -> list[Target]:
    env = {**CASTELLAN_ENV, "CASTELLAN_UPSTREAMS": json.dumps([{"name": "up", "url": upstream}])}
    gw: GatewayProcess = stack.enter_context(run_gateway(tmp / "castellan", env, timeout=120))
    grant_upstream(gw)
    token = gw.token("bench-agent", ["analysts"])
    version = subprocess.run(
        [sys.executable, "-c", "import server; print(server.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    pids = [gw.process.pid]
    return [
        Target("Castellan, built-in echo", gw.mcp_url, "echo", ("2026", "2025"), pids, token, version=version),
        Target(
            "Castellan, proxying the upstream", gw.mcp_url, "up.echo", ("2026", "2025"), pids, token, version=version
        ),
    ]


def start_mcp_proxy(stack: contextlib.ExitStack, tmp: Path, upstream: str) -> list[Target]:
    env = install("mcp-proxy")
    port = free_port()
    binary = str(env / "bin" / "mcp-proxy")
    argv = [binary, "--port", str(port), "--host", "127.0.0.1", "--log-level", "WARNING", "--"]
    argv += [binary, "--log-level", "WARNING", "--transport", "streamablehttp", upstream]
    url = f"http://127.0.0.1:{port}/mcp"
    pid = stack.enter_context(process(argv, url, tmp / "mcp-proxy.log"))
    return [Target("mcp-proxy", url, "echo", ("2025",), [pid], version=version_of(env, "mcp-proxy"))]


def start_fastmcp(stack: contextlib.ExitStack, tmp: Path, upstream: str) -> list[Target]:
    env = install("fastmcp")
    version = version_of(env, "fastmcp")
    targets = []
    for strategy, label in (("fresh", "fastmcp proxy"), ("reused", "fastmcp proxy, one reused client")):
        port = free_port()
        url = f"http://127.0.0.1:{port}/mcp"
        argv = [str(env / "bin" / "python"), str(PEER_SERVERS / "fastmcp_proxy.py"), str(port), upstream, strategy]
        pid = stack.enter_context(process(argv, url, tmp / f"fastmcp-{strategy}.log", {"FASTMCP_LOG_LEVEL": "WARNING"}))
        targets.append(Target(label, url, "echo", ("2026", "2025"), [pid], version=version))
    return targets


def _http_json(url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API request (POST when `body` is given) with a bearer token; its JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.code} {exc.read()[:300]!r}") from None


def start_contextforge(stack: contextlib.ExitStack, tmp: Path, upstream: str) -> list[Target]:
    """ContextForge with its own SQLite database, the upstream registered as a gateway through its
    admin API and exposed by a virtual server (`/servers/<id>/mcp`, the tool `up-echo`). What it
    needs to run here: strong generated secrets (it refuses weak ones in every environment), loopback
    upstreams allowed (its SSRF guard blocks them by default) and its rate limits off (100 calls a
    minute by default). It speaks the 2025 era only (2026-07-28 is refused with a 400)."""
    env = install("contextforge")
    port = free_port()
    home = tmp / "contextforge"
    home.mkdir()
    settings = {
        "MCG_HOST": "127.0.0.1",
        "MCG_PORT": str(port),
        "HOME": str(home),
        "DATABASE_URL": f"sqlite:///{home / 'mcp.db'}",
        "JWT_SECRET_KEY": secrets.token_urlsafe(48),
        "AUTH_ENCRYPTION_SECRET": secrets.token_urlsafe(48),
        "PLATFORM_ADMIN_EMAIL": "admin@example.com",
        "PLATFORM_ADMIN_PASSWORD": secrets.token_urlsafe(24),
        "BASIC_AUTH_PASSWORD": secrets.token_urlsafe(24),
        "SSRF_ALLOW_LOCALHOST": "true",
        "SSRF_ALLOW_PRIVATE_NETWORKS": "true",
        "RATE_LIMITING_ENABLED": "false",
        "TOOL_RATE_LIMIT": "1000000",
        "RATE_LIMIT_MEDIUM_RPM": "1000000",
        "CACHE_TYPE": "database",
        "MCPGATEWAY_UI_ENABLED": "false",
        "MCPGATEWAY_ADMIN_API_ENABLED": "true",
        "LOG_LEVEL": "WARNING",
    }
    base = f"http://127.0.0.1:{port}"
    pid = stack.enter_context(
        process([str(env / "bin" / "mcpgateway")], f"{base}/health", tmp / "contextforge.log", settings)
    )
    minted = subprocess.run(
        [str(env / "bin" / "python"), "-m", "mcpgateway.utils.create_jwt_token", "--username", "admin@example.com",
         "--exp", "600", "--admin", "--secret", settings["JWT_SECRET_KEY"]],
        capture_output=True, text=True, timeout=120, env={**os.environ, **settings}, check=True,
    )  # fmt: skip
    token = minted.stdout.strip().splitlines()[-1]
    gateway = _http_json(f"{base}/gateways", token, {"name": "up", "url": upstream, "transport": "STREAMABLEHTTP"})
    tools = [t for t in _http_json(f"{base}/tools", token) if t.get("gatewayId") == gateway["id"]]
    echo = next((t for t in tools if t.get("originalName") == "echo"), None)
    if echo is None:
        raise RuntimeError(f"the upstream's echo tool did not appear in ContextForge: {tools}")
    server = _http_json(f"{base}/servers", token, {"server": {"name": "bench", "associated_tools": [echo["id"]]}})
    url = f"{base}/servers/{server['id']}/mcp"
    version = version_of(env, "mcp-contextforge-gateway")
    return [Target("ContextForge", url, echo["name"], ("2025",), [pid], token, version=version)]


def start_litellm(stack: contextlib.ExitStack, tmp: Path, upstream: str) -> list[Target]:
    """LiteLLM's proxy with the upstream as an `mcp_servers` entry of its config (no database; the
    master key as the bearer token), on its aggregate `/mcp/` endpoint (the tool `up-echo`). It
    speaks the 2025 era only (2026-07-28 is refused with a 400)."""
    env = install("litellm")
    port = free_port()
    key = f"sk-{secrets.token_urlsafe(24)}"
    config = tmp / "litellm.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "model_list": [],
                "mcp_servers": {"up": {"url": upstream, "transport": "http"}},
                "general_settings": {"master_key": key},
                "litellm_settings": {"telemetry": False},
            }
        )
    )
    argv = [str(env / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    settings = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HOME": str(tmp)}
    base = f"http://127.0.0.1:{port}"
    pid = stack.enter_context(process(argv, f"{base}/health/liveliness", tmp / "litellm.log", settings))
    return [Target("LiteLLM", f"{base}/mcp/", "up-echo", ("2025",), [pid], key, version=version_of(env, "litellm"))]


STARTERS: dict[str, Callable[[contextlib.ExitStack, Path, str], list[Target]]] = {
    "castellan": start_castellan,
    "mcp-proxy": start_mcp_proxy,
    "fastmcp": start_fastmcp,
    "contextforge": start_contextforge,
    "litellm": start_litellm,
}


# -- measuring ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    samples: list[Sample] = field(default_factory=list)
    cpu: float = 0.0
    own_cpu: float = 0.0
    upstream_cpu: float = 0.0

    @property
    def calls(self) -> int:
        return sum(len(s.latencies) for s in self.samples)

    def merged(self) -> Sample:
        return Sample(
            [x for s in self.samples for x in s.latencies],
            sum(s.seconds for s in self.samples),
            sum(s.errors for s in self.samples),
            next((s.first_error for s in self.samples if s.first_error), ""),
        )


async def run_round(target: Target, upstream: Target, era: Era, calls: int, concurrency: int, tally: Tally) -> None:
    proxied = target is not upstream
    cpu0, own0, up0 = tree_cpu(target.pids), root_cpu(target.pids), tree_cpu(upstream.pids)
    try:
        sample = await drive(target.url, target.token, calls, concurrency, target.tool, era, target.headers)
    except Exception as exc:  # a target that breaks under load is counted as failing, not fatal to the run
        sample = Sample([], 0.0, calls, f"{type(exc).__name__}: {str(exc)[:300]}")
    await quiesce(target.pids)  # the work a call leaves behind (the shipper's) is its cost too
    tally.samples.append(sample)
    tally.cpu += tree_cpu(target.pids) - cpu0
    tally.own_cpu += root_cpu(target.pids) - own0
    if proxied:
        tally.upstream_cpu += tree_cpu(upstream.pids) - up0


async def measure(targets: list[Target], upstream: Target, calls: int, rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for concurrency in CONCURRENCY:
        for era in ("2026", "2025"):
            speaking = [t for t in targets if era in t.eras]
            tallies = {t.name: Tally() for t in speaking}
            for t in speaking:  # warm-up: connections, caches, JIT-less Python's first-call costs
                with contextlib.suppress(Exception):  # (a failure shows in the measured rounds)
                    await drive(t.url, t.token, max(50, concurrency * 2), concurrency, t.tool, era, t.headers)
                await quiesce(t.pids)
            for r in range(rounds):
                order = speaking if r % 2 == 0 else speaking[::-1]  # interleaved: drift hits all alike
                for t in order:
                    await run_round(t, upstream, era, calls, concurrency, tallies[t.name])
            base = tallies[upstream.name].merged()
            for t in speaking:
                tally = tallies[t.name]
                s = tally.merged()
                rows.append(
                    {
                        "target": t.name,
                        "era": era,
                        "concurrency": concurrency,
                        "calls": len(s.latencies),
                        "errors": s.errors,
                        "first_error": s.first_error,
                        "p50_ms": s.percentile(0.5) * 1e3,
                        "p99_ms": s.percentile(0.99) * 1e3,
                        "calls_per_s": s.calls_per_second,
                        "p50_x_direct": s.percentile(0.5) / base.percentile(0.5),
                        "p99_x_direct": s.percentile(0.99) / base.percentile(0.99),
                        "cps_x_direct": s.calls_per_second / base.calls_per_second
                        if base.calls_per_second
                        else float("nan"),
                        "cpu_ms_per_call": tally.cpu / max(1, tally.calls) * 1e3,
                        "main_process_cpu_ms_per_call": tally.own_cpu / max(1, tally.calls) * 1e3,
                        "upstream_cpu_ms_per_call": tally.upstream_cpu / max(1, tally.calls) * 1e3,
                    }
                )
                print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['target']} | {r['era']} | {r['concurrency']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
        f"| {r['calls_per_s']:.0f} | {r['p50_x_direct']:.2f} | {r['cps_x_direct']:.2f} "
        f"| {r['cpu_ms_per_call']:.2f} | {r['main_process_cpu_ms_per_call']:.2f} "
        f"| {r['upstream_cpu_ms_per_call']:.2f} | {r['errors']} |"
    )


HEADER = (
    "| target | era | conc | p50 ms | p99 ms | calls/s | p50 x direct | calls/s x direct "
    "| server CPU ms/call | of which main process | upstream CPU ms/call | errors |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 calls, 1 round: a few minutes")
    parser.add_argument("--calls", type=int, default=600, help="calls per round, target, era and concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(STARTERS))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the targets on the way out
    calls, rounds = (200, 1) if args.quick else (args.calls, args.rounds)
    wanted = [p for p in STARTERS if not args.only or p in args.only.split(",")]
    load_before = os.getloadavg()
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="castellan-peers-") as tmp, contextlib.ExitStack() as stack:
        upstream = start_direct(stack, Path(tmp))
        targets = [upstream]
        for peer in wanted:
            try:
                targets += STARTERS[peer](stack, Path(tmp), upstream.url)
            except Exception as exc:  # a peer that does not install or start is reported, not fatal
                skipped[peer] = f"{type(exc).__name__}: {str(exc)[:400]}"
                print(f"skipped {peer}: {skipped[peer]}", file=sys.stderr)
        print(HEADER)
        started = time.monotonic()
        rows = asyncio.run(measure(targets, upstream, calls, rounds))
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "calls_per_round": calls,
        "rounds": rounds,
        "seconds": round(time.monotonic() - started),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {t.name: t.version for t in targets if t.version},
        "skipped": skipped,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "peers.md").write_text(render(meta, rows))
    print(render(meta, rows))


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Castellan beside its peers: the same upstream echo tool, interleaved rounds, one run",
        "",
        "`python -m bench.peers` (see its docstring). Ratios are against the direct upstream in the same "
        "era, concurrency and run; server CPU per call is the target's own processes (Castellan's shipper "
        "included, measured until it has drained), upstream CPU is the echo server's share when proxied.",
        "",
        f"Machine: {meta['cpus']} cores, Python {meta['python']}; load average before {meta['load_average_before']}, "
        f"after {meta['load_average_after']} (the machine is shared: in-run ratios are what count). "
        f"{meta['calls_per_round']} calls per round, {meta['rounds']} round(s), {meta['seconds']} s, {meta['time']}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "",
        HEADER,
        *(_line(r) for r in rows),
        "",
    ]
    if meta["skipped"]:
        lines += ["Skipped:", "", *(f"- {k}: {v}" for k, v in meta["skipped"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
