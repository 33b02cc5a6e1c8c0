"""The lean client's pool keeps connections alive: concurrent rounds of requests reuse them."""

from __future__ import annotations

import asyncio
import functools

from server.upstream.http_pool import ConnectionPool

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: list[int]) -> None:
    accepted.append(1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:"))
            await reader.readexactly(length)
            await asyncio.sleep(0.001)  # the answers overlap, so the pool holds several connections
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _rounds() -> None:
    accepted: list[int] = []  # one entry per connection the server accepted
    server = await asyncio.start_server(functools.partial(_serve, accepted=accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = ConnectionPool(f"http://127.0.0.1:{port}/mcp")
    try:
        for _ in range(10):
            answers = await asyncio.gather(*(pool.request("POST", "/mcp", {}, b"{}", 5.0) for _ in range(16)))
            assert all(answer.status == 200 and answer.body == b"{}" for answer in answers)
        assert len(accepted) <= 16  # 160 requests, at most 16 at a time: no connection opened per call
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


def test_concurrent_rounds_reuse_the_pools_connections() -> None:
    asyncio.run(_rounds())
