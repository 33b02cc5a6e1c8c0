"""The governed call's Python work, in-process, without HTTP: µs of CPU per `tools/call` of the demo
`echo` tool through the real handlers and pipeline (every stage on, demo defaults, limits off, the
shipper off), as the edge's lean path calls them. Prints a line per round and the median; with
`--profile`, a cProfile of one round (the functions with the most own time, or `--sort cumulative`).

The event-loop CPU (the main thread's own CPU time) is the pipeline's Python work: the stages, the
records, the handlers, the policy input and decision log; it leaves out the store threads (the SQLite
writer) and the policy engine's own thread. The process CPU time includes those too, so it is the
whole in-process cost of a call but the HTTP edge's; the wall time per call is printed beside it.

    .venv/bin/python -m bench.pipeline_cpu [--calls 2000] [--rounds 5] [--profile 30 [--sort cumulative]] [--upstream]

`--upstream` calls `up.echo` instead: bench/direct_server.py started as upstream `up` (as bench/peers.py
registers it), so the figures are the proxied path's (the upstream's own CPU is its process's, not here).
With `--profile`, `BENCH_CALLERS=PATTERN` also prints who called the functions matching it (pstats).

To compare two trees on a shared machine, run this in both at the same time (each its own venv), a
few times: both then see the same load, and the ratio of their figures holds where each alone swings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp_types as types
from starlette.requests import Request

from bench.overhead import UNLIMITED

PROTOCOL = "2026-07-28"


@dataclass(frozen=True, slots=True)
class _ClientParams:
    client_info: types.Implementation
    capabilities: types.ClientCapabilities


@dataclass(frozen=True, slots=True)
class _Session:
    client_params: _ClientParams


@dataclass(frozen=True, slots=True)
class _Context:
    """What the handlers read of a request context, as the edge's lean path hands it over."""

    request: Request
    session: _Session
    method: str
    params: dict[str, Any]
    request_id: int
    meta: dict[str, Any] = field(default_factory=dict)


def _scope(identity: Any, request_id: int, tool: str = "echo") -> dict[str, Any]:
    from server.auth.middleware import IDENTITY_SCOPE_KEY
    from server.request_id import SCOPE_KEY

    headers = [
        (b"content-type", b"application/json"),
        (b"user-agent", b"castellan-bench/1"),
        (b"mcp-protocol-version", PROTOCOL.encode()),
        (b"mcp-method", b"tools/call"),
        (b"mcp-name", tool.encode()),
    ]
    return {
        "type": "http",
        "method": "POST",
        "path": "/mcp",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        IDENTITY_SCOPE_KEY: identity,
        SCOPE_KEY: f"req-{request_id}",
    }


async def _run(calls: int, rounds: int, profile: int, tool: str = "echo", sort: str = "tottime") -> None:
    from server import heap
    from server.auth.devkeys import mint_dev_token
    from server.gateway import build_gateway
    from server.logs import configure_logging
    from server.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)  # as `castellan serve`
    gateway = build_gateway(settings)
    await gateway.start()
    heap.settle()  # as `castellan serve` does once started (server/heap.py)
    try:
        if tool != "echo":  # the upstream's schema exists once the gateway has listed it
            for statement in ("USE SCHEMA ON SCHEMA main.upstream", "EXECUTE ON SCHEMA main.upstream"):
                grant = [sys.executable, "-m", "server", "grants", "grant", *statement.split(), "TO", "analysts"]
                await asyncio.to_thread(subprocess.run, grant, check=True, capture_output=True, timeout=60)
            await asyncio.sleep(2)  # the grants watcher picks the change up
        token = mint_dev_token(settings.data_dir, agent="bench-agent", issuer=settings.issuer,
                               audience=settings.resource_url, groups=["analysts"])  # fmt: skip
        identity = await gateway.verifier.verify(token)
        handlers = gateway.handlers
        client = _ClientParams(types.Implementation(name="castellan-bench", version="1"), types.ClientCapabilities())
        session = _Session(client)
        counter = 0

        async def one() -> None:
            nonlocal counter
            counter += 1
            params = {"name": tool, "arguments": {"text": f"call {counter}"}}
            typed = types.CallToolRequestParams.model_validate(params, by_name=False)
            ctx = _Context(Request(_scope(identity, counter, tool)), session, "tools/call", params, counter)
            result = await handlers.call_tool(ctx, typed)  # type: ignore[arg-type]
            if not isinstance(result, types.CallToolResult) or result.is_error:
                raise SystemExit(f"the call failed: {result}")

        for _ in range(300):  # warm: caches, the policy engine, the tokenizer
            await one()
        loop_us, cpu_us, wall_us = [], [], []
        for r in range(rounds):
            loop0, cpu0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
            for _ in range(calls):
                await one()
            loop_us.append((time.thread_time() - loop0) / calls * 1e6)
            cpu_us.append((time.process_time() - cpu0) / calls * 1e6)
            wall_us.append((time.perf_counter() - wall0) / calls * 1e6)
            print(f"round {r + 1}: {loop_us[-1]:7.1f} µs event-loop CPU/call, {cpu_us[-1]:7.1f} µs process CPU/call, "
                  f"{wall_us[-1]:7.1f} µs wall/call", flush=True)  # fmt: skip
        print(
            f"median of {rounds} x {calls}: {statistics.median(loop_us):.1f} µs event-loop CPU/call, "
            f"{statistics.median(cpu_us):.1f} µs process CPU/call, {statistics.median(wall_us):.1f} µs wall/call; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                await one()
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats(sort)
            stats.print_stats(profile)
            if os.environ.get("BENCH_CALLERS"):
                stats.print_callers(os.environ["BENCH_CALLERS"])
    finally:
        await gateway.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, help="print the top N functions of a cProfile round")
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"), help="the profile's order")
    parser.add_argument("--upstream", action="store_true", help="call up.echo, proxied to bench/direct_server.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        os.environ.update(UNLIMITED)
        os.environ.update(
            {
                "CASTELLAN_DATA_DIR": tmp,
                "CASTELLAN_AUDIT__SHIP": "false",
                "CASTELLAN_LOG_LEVEL": "warning",
                "CASTELLAN_LOG_FORMAT": "json",
            }
        )
        os.environ.setdefault("CASTELLAN_SERVER__PORT", "8765")
        Path(tmp).mkdir(exist_ok=True)
        tool = "echo"
        if args.upstream:
            from bench.peers import process
            from tests.gateway_process import free_port

            url = f"http://127.0.0.1:{free_port()}/mcp"
            stack.enter_context(process([sys.executable, "-m", "bench.direct_server", url.split(":")[2].split("/")[0]],
                                        url, Path(tmp) / "up.log"))  # fmt: skip
            os.environ["CASTELLAN_UPSTREAMS"] = json.dumps([{"name": "up", "url": url}])
            tool = "up.echo"
        asyncio.run(_run(args.calls, args.rounds, args.profile, tool, args.sort))


if __name__ == "__main__":
    main()
