"""The gateway's HTTP protocol puts a response's head and body on the socket in one write, and the bytes a
client receives are exactly uvicorn's own (JSON answers, streams, empty bodies, closes, large bodies,
pipelined requests)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from server import http_protocol
from server.http_protocol import JOIN_LIMIT, CoalescingProtocol, CoalescingTransport
from server.in_flight import WORKING, alone

pytestmark = pytest.mark.anyio


class Recording:
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def coalescing() -> tuple[CoalescingTransport, Recording]:
    real = Recording()
    return CoalescingTransport(real, asyncio.get_running_loop()), real  # type: ignore[arg-type]


async def test_a_head_and_its_body_leave_in_one_write() -> None:
    transport, real = coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)
    assert len(real.writes) == 1


async def test_a_lone_write_leaves_within_the_loop_iteration() -> None:
    transport, real = coalescing()
    transport.write(b"head")
    assert real.writes == []
    await asyncio.sleep(0)
    assert real.writes == [b"head"]


async def test_close_writes_what_is_held_first() -> None:
    transport, real = coalescing()
    transport.write(b"last")
    transport.close()
    assert real.writes == [b"last"]
    assert real.closed


async def test_large_parts_are_not_copied_together() -> None:
    transport, real = coalescing()
    big = b"x" * JOIN_LIMIT
    transport.write(b"head")
    transport.write(big)
    assert real.writes == [b"head", big]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Responses of every shape the gateway sends, chosen by path."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    path = scope["path"]

    async def start(status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})

    if path == "/json":
        await start(200, [(b"content-length", b"11"), (b"content-type", b"application/json")])
        await send({"type": "http.response.body", "body": b'{"ok":true}'})
    elif path == "/stream":
        await start(200, [(b"content-type", b"text/event-stream")])
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/empty":
        await start(204, [])
        await send({"type": "http.response.body", "body": b""})
    elif path == "/close":
        await start(400, [(b"content-length", b"3"), (b"connection", b"close")])
        await send({"type": "http.response.body", "body": b"bye"})
    elif path == "/large":
        body = b"y" * (3 * JOIN_LIMIT)
        await start(200, [(b"content-length", str(len(body)).encode())])
        await send({"type": "http.response.body", "body": body})
    else:
        await start(404, [(b"content-length", b"0")])
        await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def serving(http: Any) -> AsyncIterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=http, lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):  # up to 10 s
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on one connection, then read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return re.sub(rb"date: [^\r]*\r\n", b"date: -\r\n", received)


def request(path: str, *, close: bool = False, body: bytes = b"") -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n".encode() + connection + b"\r\n" + body


@pytest.mark.parametrize(
    "raw",
    [
        request("/json", close=True, body=b"{}"),
        request("/stream", close=True),
        request("/empty", close=True),
        request("/close"),
        request("/large", close=True),
        request("/json") + request("/empty") + request("/json", close=True),  # pipelined on one connection
        request("/missing", close=True),
        b"NOT HTTP\r\n\r\n",
    ],
    ids=["json", "stream", "empty", "server-close", "large", "pipelined", "404", "garbage"],
)
async def test_clients_receive_exactly_uvicorns_bytes(raw: bytes) -> None:
    async with serving("auto") as plain_port, serving(CoalescingProtocol) as port:
        plain = await exchange(plain_port, raw)
        coalesced = await exchange(port, raw)
    assert coalesced == plain
    assert plain.startswith(b"HTTP/1.1 ")


class Counting:
    """The socket's transport, counting the writes that reach it."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def test_the_server_writes_a_json_answer_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    sockets: list[Counting] = []

    class Counted(CoalescingTransport):
        def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
            sockets.append(Counting(transport))
            super().__init__(sockets[-1], loop)  # type: ignore[arg-type]

    monkeypatch.setattr(http_protocol, "CoalescingTransport", Counted)
    async with serving(CoalescingProtocol) as port:
        answer = await exchange(port, request("/json", close=True, body=b"{}"))
    assert answer.endswith(b'{"ok":true}')
    assert len(sockets) == 1
    (written,) = sockets[0].writes  # status line, headers and body: one write
    assert re.sub(rb"date: [^\r]*\r\n", b"date: -\r\n", written) == answer


async def test_the_loop_counts_its_open_connections_and_is_not_alone_beside_several() -> None:
    before = len(WORKING.open_connections)

    async def open_connections(expected: int) -> int:
        for _ in range(500):  # up to 5 s for the server to accept or drop them
            if len(WORKING.open_connections) == expected:
                break
            await asyncio.sleep(0.01)
        return len(WORKING.open_connections)

    async with serving(CoalescingProtocol) as port:
        opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        assert await open_connections(before + 3) == before + 3
        assert not alone()  # three agents' connections: a commit goes to the writer thread
        for _, writer in opened:
            writer.close()
        assert await open_connections(before) == before
        assert alone()
