"""Micro-benchmark of the HTTP edge in front of every /mcp call, in two parts, each A/B in one run.

`stack`: CPU µs per request through the app to the protocol edge, in process (no sockets): the real
request id, transport guard, body limit and bearer authentication (a valid token, verified once and then
cached, as in a session of calls), with the protocol edge replaced by a fixed JSON answer so that only
the layers in front of it are measured; `app` (what uvicorn calls) against `full` (the FastAPI stack,
where the build has `GatewayApp.full_stack`). Run it from another checkout's root with that checkout's
venv to measure that code (`cd /tmp/base && .venv/bin/python /path/to/bench/edge.py stack`).

`wire`: CPU µs per keep-alive request of a uvicorn server process answering a small JSON body, with
uvicorn's own protocol (`auto`) against the gateway's (`coalescing`: head and body in one write).

    .venv/bin/python bench/edge.py stack|wire [--rounds 5] [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())

ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}'


def _body() -> bytes:
    from bench.load import call_body

    return call_body("echo", {"text": "hello"}, 1)


async def _stack(rounds: int, requests: int) -> None:
    from server.app import create_app
    from server.auth.devkeys import mint_dev_token
    from server.logs import configure_logging
    from server.protocol.fast import FastEdge
    from server.settings import Settings

    async def answer(self: Any, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-length", str(len(ANSWER)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})

    FastEdge.__call__ = answer  # type: ignore[method-assign]
    configure_logging("json", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    settings = Settings(data_dir=tmp, audit={"ship": False}, policy={"engine": "embedded", "reload": False})
    app = create_app(settings)
    token = mint_dev_token(tmp, agent="bench", issuer=settings.issuer, audience=settings.resource_url, groups=[])
    body = _body()
    headers = [
        (b"host", b"127.0.0.1:8750"),
        (b"content-type", b"application/json"),
        (b"accept", b"application/json, text/event-stream"),
        (b"mcp-protocol-version", b"2026-07-28"),
        (b"mcp-method", b"tools/call"),
        (b"mcp-name", b"echo"),
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-length", str(len(body)).encode()),
        (b"user-agent", b"bench"),
    ]

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/mcp",
            "raw_path": b"/mcp",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8750),
            "state": {},
        }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    targets = {"app": app}
    if hasattr(app, "full_stack"):
        targets["full"] = app.full_stack
    results: dict[str, list[float]] = {name: [] for name in targets}
    for target in targets.values():  # warm: the verifier's cache, the middleware stack
        await target(scope(), receive, send)
    for _ in range(rounds):
        for name, target in targets.items():
            sent.clear()
            start = time.process_time()
            for _ in range(requests):
                await target(scope(), receive, send)
            results[name].append((time.process_time() - start) / requests * 1e6)
            assert sent == [200] * requests, sent[:3]
    _report("stack", results)


SERVER = """
import sys, uvicorn
BODY = %r
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-length", str(len(BODY)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
http = sys.argv[2]
if http == "coalescing":
    from server.http_protocol import CoalescingProtocol as http
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=http, log_config=None, access_log=False,
            server_header=False)
"""


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(port: int, requests: int, body: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = (
        f"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    for _ in range(requests):
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()


def _wire(rounds: int, requests: int) -> None:
    import socket

    body = _body()
    results: dict[str, list[float]] = {"auto": [], "coalescing": []}
    servers = {}
    for http in results:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", SERVER % ANSWER, str(port), http], cwd=os.getcwd())
        servers[http] = (proc, port)
    try:
        for _proc, port in servers.values():
            for _ in range(100):
                try:
                    asyncio.run(_drive(port, 10, body))
                    break
                except OSError:
                    time.sleep(0.1)
        for _ in range(rounds):
            for http, (proc, port) in servers.items():
                before = _cpu(proc.pid)
                asyncio.run(_drive(port, requests, body))
                results[http].append((_cpu(proc.pid) - before) / requests * 1e6)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    _report("wire", results)


def _report(part: str, results: dict[str, list[float]]) -> None:
    load = os.getloadavg()[0]
    summary = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
    print(json.dumps({"part": part, "median_us_per_request": summary, "rounds": results, "load": load}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["stack", "wire"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    if args.part == "stack":
        asyncio.run(_stack(args.rounds, args.requests))
    else:
        _wire(args.rounds, args.requests)


if __name__ == "__main__":
    main()
