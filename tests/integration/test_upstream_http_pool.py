"""The lean client's connection pool against a loopback HTTP server that answers exactly as told:
keep-alive reuse, chunked and `Connection: close` answers, a server that drops idle connections,
redirects, request splitting refused, a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import pytest

from server.upstream import http_pool
from server.upstream.http_client import HttpUpstreamClient, UpstreamProtocolError
from server.upstream.http_pool import ConnectionPool, UpstreamDisconnected

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Answer = Callable[[bytes, bytes], bytes]
"""(request head, request body) → the raw bytes to answer with."""


def _json(body: bytes, *, close: bool = False, status: str = "200 OK", extra: str = "") -> bytes:
    connection = "connection: close\r\n" if close else ""
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{connection}{extra}\r\n"
    ).encode() + body


class Server:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head)
                writer.write(self.answer(head, body))
                await writer.drain()
                if b"connection: close" in self.answer(head, body).lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_idle(self) -> None:
        for writer in self.writers:
            writer.close()


@contextlib.asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        server.drop_idle()


def _echo(head: bytes, body: bytes) -> bytes:
    return _json(body)


async def test_requests_reuse_one_kept_alive_connection() -> None:
    async with serving(_echo) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/mcp")
        try:
            for n in range(3):
                response = await pool.request("POST", "/mcp", {"x-n": str(n)}, b'{"n": %d}' % n, 5)
                assert (response.status, json.loads(response.body)) == (200, {"n": n})
                assert response.headers["content-type"] == "application/json"
        finally:
            pool.close()
    assert server.connections == 1
    assert all(b"host: 127.0.0.1:%d" % server.port in r for r in server.requests)


async def test_a_chunked_answer_is_read_whole() -> None:
    def chunked(head: bytes, body: bytes) -> bytes:
        return b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'

    async with serving(chunked) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            first = await pool.request("POST", "/", {}, b"{}", 5)
            second = await pool.request("POST", "/", {}, b"{}", 5)
        finally:
            pool.close()
    assert json.loads(first.body) == json.loads(second.body) == {"a": 1}
    assert server.connections == 1


async def test_a_connection_the_server_closes_is_not_reused() -> None:
    async with serving(lambda head, body: _json(body, close=True)) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            for _ in range(2):
                assert (await pool.request("POST", "/", {}, b"{}", 5)).status == 200
        finally:
            pool.close()
    assert server.connections == 2


async def test_a_server_that_drops_idle_connections_gets_a_new_one() -> None:
    async with serving(_echo) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            assert (await pool.request("POST", "/", {}, b"{}", 5)).status == 200
            server.drop_idle()  # e.g. its keep-alive timeout
            await asyncio.sleep(0.05)
            assert (await pool.request("POST", "/", {}, b"{}", 5)).status == 200
        finally:
            pool.close()
    assert server.connections == 2


async def test_idle_connections_older_than_the_limit_are_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_pool, "IDLE_SECONDS", 0.0)
    async with serving(_echo) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            for _ in range(2):
                await pool.request("POST", "/", {}, b"{}", 5)
        finally:
            pool.close()
    assert server.connections == 2


async def test_a_broken_answer_is_a_disconnection_not_a_result() -> None:
    async with serving(lambda head, body: b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{}") as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            task = asyncio.ensure_future(pool.request("POST", "/", {}, b"{}", 5))
            await asyncio.sleep(0.1)
            server.drop_idle()  # the body never completes
            with pytest.raises(UpstreamDisconnected):
                await task
        finally:
            pool.close()


async def test_a_silent_server_times_out() -> None:
    async with serving(lambda head, body: b"") as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            with pytest.raises(TimeoutError):
                await pool.request("POST", "/", {}, b"{}", 0.2)
        finally:
            pool.close()


@pytest.mark.parametrize("header", [("x-a", "v\r\nx-injected: 1"), ("x-a\r\nx-b", "v"), ("x-a", "v\nx")])
async def test_a_header_that_would_split_the_request_is_refused(header: tuple[str, str]) -> None:
    async with serving(_echo) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            with pytest.raises(ValueError, match="forbids"):
                await pool.request("POST", "/", dict([header]), b"{}", 5)
        finally:
            pool.close()
    assert server.requests == []


def _mcp_answer(head: bytes, body: bytes) -> bytes:
    request = json.loads(body)
    result = {"content": [{"type": "text", "text": "ok"}], "structuredContent": {"path": head.split(b" ")[1].decode()}}
    return _json(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode())


async def test_a_same_origin_redirect_is_followed_and_remembered() -> None:
    def moved(head: bytes, body: bytes) -> bytes:
        if head.startswith(b"POST /mcp "):
            return _json(b"", status="307 Temporary Redirect", extra="location: /mcp/\r\n")
        return _mcp_answer(head, body)

    async with serving(moved) as server:
        client = HttpUpstreamClient(f"http://127.0.0.1:{server.port}/mcp", {}, "2026-07-28", 5)
        try:
            first = await client.call_tool("echo", {"text": "a"})
            second = await client.call_tool("echo", {"text": "b"})
        finally:
            await client.close()
    assert first.structured_content == second.structured_content == {"path": "/mcp/"}
    assert [r.split(b" ")[1] for r in server.requests] == [b"/mcp", b"/mcp/", b"/mcp/"]


async def test_a_redirect_to_another_origin_is_not_followed() -> None:
    def elsewhere(head: bytes, body: bytes) -> bytes:
        return _json(b"", status="307 Temporary Redirect", extra="location: http://127.0.0.2:1/mcp\r\n")

    async with serving(elsewhere) as server:
        url = f"http://127.0.0.1:{server.port}/mcp"
        client = HttpUpstreamClient(url, {"authorization": "Bearer gw"}, "2026-07-28", 5)
        try:
            with pytest.raises(UpstreamProtocolError, match="another origin"):
                await client.call_tool("echo", {"text": "a"})
        finally:
            await client.close()


async def test_per_call_headers_replace_the_gateways_own_whatever_their_case() -> None:
    async with serving(_mcp_answer) as server:
        url = f"http://127.0.0.1:{server.port}/mcp"
        client = HttpUpstreamClient(url, {"Authorization": "Bearer gw"}, "2026-07-28", 5)
        try:
            await client.call_tool("echo", {"text": "a"}, headers={"AUTHORIZATION": "Bearer user"})
        finally:
            await client.close()
    (head,) = server.requests
    assert head.lower().count(b"authorization:") == 1
    assert b"authorization: Bearer user" in head


async def test_a_server_that_answers_twice_does_not_answer_the_next_request() -> None:
    async with serving(lambda head, body: _json(b'{"n": 1}') + _json(b'{"n": 2}')) as server:
        pool = ConnectionPool(f"http://127.0.0.1:{server.port}/")
        try:
            first = await pool.request("POST", "/", {}, b"{}", 5)
            second = await pool.request("POST", "/", {}, b"{}", 5)
        finally:
            pool.close()
    assert json.loads(first.body) == json.loads(second.body) == {"n": 1}
    assert server.connections == 2
