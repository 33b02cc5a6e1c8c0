"""Gateway CPU per call on the proxied path beside the built-in one, in both eras, interleaved.

One gateway (every stage on, shipping off unless `--ship`) fronting bench/direct_server.py as the
upstream `up` (registered as bench/peers.py registers it); rounds alternate the built-in `echo` and
the proxied `up.echo` so load drift hits both alike. Prints, per era and concurrency, calls/s and the
gateway process's CPU ms per call for each, and the proxied call's extra CPU over the built-in one
(what the upstream leg costs the gateway). `--profile OUT` then records each tool under py-spy
(raw format, for /work/helpers/prof/collapse.py style tooling).

    .venv/bin/python -m bench.proxied_cpu [--calls 600] [--rounds 3] [--era both] [--conc 1,16,64]
    .venv/bin/python -m bench.proxied_cpu --leg [--calls 2000]   # the upstream leg alone, in this process

`--leg` times, alternating, this process's CPU per `tools/call` to the same upstream through the
lean client and through a plain pooled aiohttp POST of the same bytes (what the lean client used to be).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.load import Era, drive
from bench.overhead import UNLIMITED
from bench.peers import grant_upstream, process
from tests.gateway_process import free_port, run_gateway

TICKS = os.sysconf("SC_CLK_TCK")
SPY = "/tmp/spyvenv/bin/py-spy"
SPY_RATE = ("--rate", "250", "--nonblocking")
SPY_ARGS = os.environ.get("SPY_ARGS", "").split()
"""More py-spy options (e.g. `--gil`)."""


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def stage_seconds(base_url: str) -> dict[str, float]:
    """Each stage's total seconds so far, from the gateway's Prometheus histograms."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("castellan_stage_seconds_sum{"):
            labels, value = line.split("} ")
            stage = labels.split('stage="')[1].split('"')[0]
            totals[stage] = totals.get(stage, 0.0) + float(value)
    return totals


async def _leg(url: str, calls: int, rounds: int) -> None:
    import aiohttp

    from server.upstream.http_client import HttpUpstreamClient

    lean = HttpUpstreamClient(url, {}, "2026-07-28", 30)
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "echo",
    }
    async with aiohttp.ClientSession() as http:

        async def pooled_aiohttp(i: int) -> None:
            params = {"name": "echo", "arguments": {"text": f"call {i}"}, "_meta": meta}
            body = json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params})
            async with http.post(url, data=body, headers=headers) as resp:
                json.loads(await resp.read())

        async def lean_client(i: int) -> None:
            await lean.call_tool("echo", {"text": f"call {i}"})

        for _ in range(rounds):
            for label, send in (("aiohttp POST", pooled_aiohttp), ("lean client", lean_client)):
                for i in range(100):
                    await send(i)
                started = time.process_time()
                for i in range(calls):
                    await send(i)
                print(f"{label}: {(time.process_time() - started) / calls * 1e3:.3f} ms CPU/call", flush=True)
    await lean.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--era", default="both", choices=("2026", "2025", "both"))
    parser.add_argument("--conc", default="1")
    parser.add_argument("--ship", action="store_true")
    parser.add_argument("--profile", default="", help="write py-spy raw profiles of each tool here")
    parser.add_argument("--leg", action="store_true", help="time the upstream leg alone (see above)")
    args = parser.parse_args()
    eras: list[Era] = ["2026", "2025"] if args.era == "both" else [args.era]
    with tempfile.TemporaryDirectory(prefix="proxied-cpu-") as tmp, contextlib.ExitStack() as stack:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}/mcp"
        up_pid = stack.enter_context(
            process([sys.executable, "-m", "bench.direct_server", str(port)], upstream, Path(tmp) / "up.log")
        )
        if args.leg:
            import uvloop

            print(f"load {os.getloadavg()[0]:.2f}")
            uvloop.run(_leg(upstream, args.calls, args.rounds))
            print(f"load {os.getloadavg()[0]:.2f}")
            return
        env = {
            **UNLIMITED,
            "CASTELLAN_AUDIT__SHIP": "true" if args.ship else "false",
            "CASTELLAN_UPSTREAMS": json.dumps([{"name": "up", "url": upstream}]),
        }
        env.update({k[4:]: v for k, v in os.environ.items() if k.startswith("GWE_")})
        gw = stack.enter_context(run_gateway(Path(tmp) / "gw", env, timeout=120))
        grant_upstream(gw)
        token = gw.token("bench-agent", ["analysts"])
        pid = gw.process.pid
        print(f"load {os.getloadavg()[0]:.2f}")
        for conc in [int(c) for c in args.conc.split(",")]:
            for era in eras:
                totals = {"echo": [0.0, 0, 0.0, 0.0], "up.echo": [0.0, 0, 0.0, 0.0]}
                stages: dict[str, dict[str, float]] = {"echo": {}, "up.echo": {}}
                for tool in totals:  # warm-up
                    asyncio.run(drive(gw.mcp_url, token, max(100, conc * 4), conc, tool, era))
                for r in range(args.rounds):
                    for tool in ("echo", "up.echo") if r % 2 == 0 else ("up.echo", "echo"):
                        before, up_before, stages_before = cpu(pid), cpu(up_pid), stage_seconds(gw.base_url)
                        s = asyncio.run(drive(gw.mcp_url, token, args.calls, conc, tool, era))
                        for stage, seconds in stage_seconds(gw.base_url).items():
                            spent = seconds - stages_before.get(stage, 0.0)
                            stages[tool][stage] = stages[tool].get(stage, 0.0) + spent
                        if s.errors:
                            raise SystemExit(f"{tool}: {s.errors} errors: {s.first_error}")
                        t = totals[tool]
                        t[0] += cpu(pid) - before
                        t[1] += len(s.latencies)
                        t[2] += s.seconds
                        t[3] += cpu(up_pid) - up_before
                line = []
                for tool, (used, n, secs, up_used) in totals.items():
                    line.append(f"{tool}: {n / secs:.0f}/s {used / n * 1e3:.2f} ms (upstream {up_used / n * 1e3:.2f})")
                extra = (totals["up.echo"][0] / totals["up.echo"][1] - totals["echo"][0] / totals["echo"][1]) * 1e3
                print(f"{era} c={conc}: " + "; ".join(line) + f"; proxied extra {extra:+.2f} ms/call", flush=True)
                for tool, spent in stages.items():
                    n = totals[tool][1]
                    walls = ", ".join(f"{stage} {seconds / n * 1e3:.2f}" for stage, seconds in sorted(spent.items()))
                    print(f"    {tool} stage wall ms/call: {walls}", flush=True)
        print(f"load {os.getloadavg()[0]:.2f}")
        if args.profile:
            for era, tool in [(e, t) for e in eras for t in os.environ.get("SPY_TOOLS", "up.echo,echo").split(",")]:
                out = f"{args.profile}.{era}.{tool}"
                spy = subprocess.Popen(
                    [SPY, "record", "--pid", str(pid), "--format", "raw", "-o", out, *SPY_RATE, *SPY_ARGS],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
                asyncio.run(drive(gw.mcp_url, token, args.calls, 1, tool, era))
                spy.send_signal(2)
                spy.wait()
                print("profile written to", out)


if __name__ == "__main__":
    main()
