"""Keep-alive HTTP/1.1 connections to one upstream origin for the lean client's POSTs.

The lean client's requests are all alike (a small JSON POST, a small answer), so a general HTTP
client's per-request machinery (aiohttp's: request/response objects, multidicts, cookie jar, timers,
tracing) is most of the leg's CPU: about 0.45 ms a call against 0.19 ms for a request written on a
pooled asyncio transport and its answer parsed by httptools (llhttp, the parser uvicorn uses). So
this module writes the request line and headers itself and leaves parsing to httptools: Content-Length
or chunked bodies, keep-alive, `Connection: close`.

Each connection carries one request at a time (no pipelining). Idle connections are reused newest
first and dropped after `IDLE_SECONDS`, below the common servers' keep-alive (uvicorn's 5 s), so a
request is not written into a connection the server is closing; a POST is never retried (it may have
run). Header names and values with CR, LF or NUL are refused (no request splitting). Raises
`UpstreamDisconnected` (a `ConnectionError`) when the connection breaks or the answer is not HTTP,
`TimeoutError` past the deadline; either way the connection is discarded.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

IDLE_SECONDS = 4.0
MAX_IDLE = 256
MAX_BODY = 64 * 1024 * 1024
"""An answer larger than this is refused (the gateway's result limits are far smaller)."""
_UNSAFE = re.compile(r"[\r\n\x00]")


class UpstreamDisconnected(ConnectionError):
    """The connection broke (or the answer is not HTTP) before the whole answer arrived."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and its response parser."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # nothing asked: a server that talks out of turn is not reused
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamDisconnected(f"the upstream's answer is not HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost tells a waiting request

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamDisconnected(f"the upstream closed the connection: {exc or 'end of stream'}"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer to one request: the connection cannot be trusted
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY:
            self._fail(UpstreamDisconnected(f"the upstream's answer is larger than {MAX_BODY} bytes"))
            return
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        response = Response(self._parser.get_status_code(), self._headers, b"".join(self._chunks))
        if not self._parser.should_keep_alive():
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # ours
    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._headers, self._chunks, self._size = {}, [], 0
        self.transport.write(data)
        return self._waiter

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Requests to `url`'s origin over reused connections. `close()` closes them all."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default else f"{host}:{self.port}"
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._closed = False

    def origin_of(self, url: str) -> bool:
        """`url` is on this pool's origin (scheme, host and port)."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return (parts.scheme, parts.hostname, port) == (self.scheme, self.host, self.port)

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, within: float
    ) -> Response:
        """`method` `target` (the path and query) with `headers` and `body`, within `within` seconds."""
        head = [f"{method} {target} HTTP/1.1\r\nhost: {self.authority}\r\ncontent-length: {len(body)}\r\n"]
        for name, value in headers.items():
            if _UNSAFE.search(name) or _UNSAFE.search(value) or ":" in name:
                raise ValueError(f"header {name!r} has a character HTTP forbids there")
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        request = "".join(head).encode("latin-1") + body
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(within):
                connection = await self._acquire()
                response = await connection.send(request)
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        self._release(connection)
        return response

    async def _acquire(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {"ssl": self._ssl, "server_hostname": self.host} if self._ssl is not None else {}
        _, connection = await loop.create_connection(_Connection, self.host, self.port, **kwargs)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or self._closed or len(self._idle) >= MAX_IDLE:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
