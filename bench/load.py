"""A lean MCP load client: raw `tools/call` POSTs over one pooled aiohttp session, in either protocol era.

The mcp SDK client's HTTP stack is slower than any server here, so it would measure itself; this sends
the exact bytes a client of each era sends: 2026-07-28 (stateless, the `_meta` envelope and the
Mcp-Method/Mcp-Name headers on every request) or 2025-11-25 (an `initialize` handshake, then the
session's Mcp-Session-Id on each call). Responses may be JSON or a one-event SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from bench.stats import percentile

PROTOCOL = "2026-07-28"
HANDSHAKE_PROTOCOL = "2025-11-25"
Era = Literal["2026", "2025"]
CLIENT_INFO = {"name": "castellan-bench", "version": "1"}


def call_body(tool: str, arguments: dict[str, object], request_id: int, era: Era = "2026") -> bytes:
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    if era == "2026":
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": PROTOCOL,
            "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


def call_headers(tool: str, token: str | None = None, era: Era = "2026") -> dict[str, str]:
    """The HTTP headers a client of `era` sends beside a `tools/call` body (and the bearer token)."""
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if era == "2026":
        headers |= {"mcp-protocol-version": PROTOCOL, "mcp-method": "tools/call", "mcp-name": tool}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def parse_body(content_type: str, raw: bytes) -> Any:
    """The JSON-RPC response in a JSON body, or in the last `data:` event of an SSE stream."""
    if "text/event-stream" in content_type:
        payload = None
        for line in raw.decode().splitlines():
            if line.startswith("data:") and line[5:].strip():
                message = json.loads(line[5:])
                if "id" in message:
                    payload = message
        return payload or {}
    return json.loads(raw) if raw else {}


async def open_session(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> dict[str, str]:
    """The 2025-era handshake: `initialize`, then `notifications/initialized`. Returns the headers every
    later request carries (the Mcp-Session-Id, if the server made a session, and the protocol version)."""
    body = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": HANDSHAKE_PROTOCOL, "capabilities": {}, "clientInfo": CLIENT_INFO},
    }
    async with session.post(url, json=body, headers=headers) as resp:
        answer = parse_body(resp.headers.get("content-type", ""), await resp.read())
        if resp.status != 200 or "result" not in answer:
            raise RuntimeError(f"initialize failed: {resp.status} {str(answer)[:300]}")
        sid = resp.headers.get("mcp-session-id")
    version = answer["result"].get("protocolVersion", HANDSHAKE_PROTOCOL)
    extra = {"mcp-protocol-version": version} | ({"mcp-session-id": sid} if sid else {})
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with session.post(url, json=note, headers=headers | extra) as resp:
        await resp.read()
    return extra


@dataclass
class Sample:
    latencies: list[float]
    seconds: float
    errors: int
    first_error: str = ""

    @property
    def calls_per_second(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)


async def drive(
    url: str,
    token: str | None,
    calls: int,
    concurrency: int,
    tool: str = "echo",
    era: Era = "2026",
    extra_headers: dict[str, str] | None = None,
) -> Sample:
    """`calls` calls spread over `concurrency` workers; every call must succeed (not isError)."""
    headers = call_headers(tool, token, era) | (extra_headers or {})
    latencies: list[float] = []
    errors = 0
    first_error = ""
    counter = iter(range(calls))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, first_error
        for i in counter:
            body = call_body(tool, {"text": f"call {i}"}, i + 1, era)
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                payload = parse_body(resp.headers.get("content-type", ""), await resp.read())
            latencies.append(time.perf_counter() - started)
            if resp.status != 200 or "result" not in payload or payload["result"].get("isError"):
                errors += 1
                first_error = first_error or f"{resp.status} {str(payload)[:300]}"

    async with aiohttp.ClientSession(connector=connector) as session:
        if era == "2025":
            headers |= await open_session(session, url, headers)
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Sample(latencies, seconds, errors, first_error)
