"""The HTTP/1.1 server protocol: uvicorn's own, with a response's head and body written to the socket at once.

Uvicorn writes a response's status line and headers when the app sends `http.response.start`, and its
body on `http.response.body`: two `send` system calls, two TCP segments and, on the other end, two
wake-ups, for every JSON answer. `CoalescingProtocol` is uvicorn's protocol class ("auto": httptools,
else h11) with one change, at its transport: a write is held until the next write or the end of the
event loop's current iteration, whichever comes first, and goes out joined with that next write. A
head and a complete body sent back to back (every JSON response) leave in one write; a streamed
response (SSE) still sends each part within the same loop iteration it was written in. The bytes on
the wire, and their order, are exactly uvicorn's.

Why this way: uvicorn takes the protocol class as a documented setting (`http=`), and
`connection_made(transport)` is asyncio's public protocol API, so nothing of uvicorn's request handling
is copied or patched; the alternatives were re-implementing its request cycle (to write the head with
the body) or another server.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from server.in_flight import WORKING

JOIN_LIMIT = 65_536
"""A held write and the next one are joined (one copy) up to this size; larger ones go out as two."""


class CoalescingTransport:
    """An `asyncio.Transport` whose writes are held until the next write or the loop's next iteration.

    Everything but `write`, `writelines`, `close` and `abort` is the wrapped transport's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | bytearray | memoryview | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._held = None
        if len(held) + len(data) <= JOIN_LIMIT:
            self._transport.write(b"".join((held, data)))
        else:
            self._transport.write(held)
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.flush()
        self._transport.writelines(chunks)

    def flush(self) -> None:
        """Write what is held now (the loop calls this at the end of the iteration it was held in)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()  # what was written before close goes out, as with the plain transport
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + (len(self._held) if self._held is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """Uvicorn's HTTP/1.1 protocol, over a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))
        # server/in_flight: the open connections of this loop's server, as uvicorn keeps them (a
        # connection leaves the set when it closes, or when it is upgraded and its WebSocket protocol
        # takes the set over)
        WORKING.open_connections = self.connections
