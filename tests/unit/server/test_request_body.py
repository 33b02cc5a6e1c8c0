"""A /mcp POST body is read once and parsed at most once, whichever of the edge's readers asks first;
the SDK behind them still receives it whole."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.types import Message

from server import request_body
from server.request_body import UNREADABLE, buffered, tool_call_params

pytestmark = pytest.mark.anyio


def chunks(*parts: bytes) -> Any:
    messages: list[Message] = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]
    messages.append({"type": "http.disconnect"})

    async def receive() -> Message:
        return messages.pop(0)

    return receive


async def test_every_reader_of_a_request_shares_one_read_and_one_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    parses = 0
    real = json.loads

    def counting(raw: Any) -> Any:
        nonlocal parses
        parses += 1
        return real(raw)

    monkeypatch.setattr(request_body.json, "loads", counting)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}).encode()
    scope: dict[str, Any] = {"type": "http"}
    first, receive = await buffered(scope, chunks(body[:10], body[10:]))
    second, receive = await buffered(scope, receive)  # the next middleware, handed the replay
    assert second is first
    assert tool_call_params(first) == {"name": "echo"}
    assert tool_call_params(second) == {"name": "echo"}
    assert parses == 1
    assert await receive() == {"type": "http.request", "body": body, "more_body": False}
    assert (await receive())["type"] == "http.disconnect"


async def test_an_unreadable_body_is_said_so_and_still_replayed() -> None:
    body, receive = await buffered({"type": "http"}, chunks(b"[" * 100_000))
    assert body.message() is UNREADABLE
    assert tool_call_params(body) is None
    assert (await receive())["body"] == b"[" * 100_000


async def test_the_guard_reads_the_body_once_and_the_edge_finds_it() -> None:
    scope: dict[str, Any] = {"type": "http", "headers": [(b"content-length", b"11")]}
    read = await request_body.read_bounded(scope, chunks(b"hello", b" world"), 11)
    assert read is not None
    body, receive = read
    again, receive = await buffered(scope, receive)
    assert again is body
    assert body.raw == b"hello world"
    assert await receive() == {"type": "http.request", "body": b"hello world", "more_body": False}
    assert (await receive())["type"] == "http.disconnect"


@pytest.mark.parametrize(
    ("headers", "parts"),
    [([(b"content-length", b"12")], [b"x"]), ([], [b"hello", b" world!"]), ([(b"content-length", b"1")], [b"xx" * 10])],
    ids=["declared", "streamed", "understated"],
)
async def test_a_body_over_the_limit_is_refused(headers: list[tuple[bytes, bytes]], parts: list[bytes]) -> None:
    scope: dict[str, Any] = {"type": "http", "headers": headers}
    assert await request_body.read_bounded(scope, chunks(*parts), 11) is None
    assert request_body.SCOPE_KEY not in scope


async def test_a_body_cut_off_by_a_disconnect_is_replayed_as_incomplete() -> None:
    messages: list[Message] = [{"type": "http.request", "body": b"par", "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    read = await request_body.read_bounded({"type": "http", "headers": []}, receive, 100)
    assert read is not None
    _, replay = read
    assert await replay() == {"type": "http.request", "body": b"par", "more_body": True}
    assert (await replay())["type"] == "http.disconnect"
