"""A lean MCP load client: raw 2026-07-28 `tools/call` POSTs over one pooled aiohttp session.

The mcp SDK client's HTTP stack is slower than either server here, so it would measure itself;
this sends the exact bytes a modern client sends (headers and `_meta` envelope included).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from bench.stats import percentile

PROTOCOL = "2026-07-28"


def call_body(tool: str, arguments: dict[str, object], request_id: int) -> bytes:
    meta = {
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientInfo": {"name": "castellan-bench", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    params = {"name": tool, "arguments": arguments, "_meta": meta}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


def call_headers(tool: str, token: str | None = None) -> dict[str, str]:
    """The HTTP headers a 2026-07-28 client sends beside a `tools/call` body (and the bearer token)."""
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL,
        "mcp-method": "tools/call",
        "mcp-name": tool,
    }
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


@dataclass
class Sample:
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)


async def drive(url: str, token: str | None, calls: int, concurrency: int, tool: str = "echo") -> Sample:
    """`calls` calls spread over `concurrency` workers; every call must succeed (not isError)."""
    headers = call_headers(tool, token)
    latencies: list[float] = []
    errors = 0
    counter = iter(range(calls))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in counter:
            body = call_body(tool, {"text": f"call {i}"}, i)
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                payload = await resp.json(content_type=None)
            latencies.append(time.perf_counter() - started)
            if resp.status != 200 or "result" not in payload or payload["result"].get("isError"):
                errors += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Sample(latencies, seconds, errors)
