"""The gateway's log notifications of what it decided: only to a client that asked, never a failure."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from server.call import Call, RunInfo
from server.errors import Denied
from server.protocol.logging import LogLevels

pytestmark = pytest.mark.anyio


class Connection:
    """Stands for the SDK's per-client connection (held weakly by the levels)."""


class Session:
    def __init__(self) -> None:
        self._connection = Connection()
        self.sent: list[tuple[str, Any]] = []

    async def send_log_message(self, level: str, data: Any, logger: str, related_request_id: Any = None) -> None:
        self.sent.append((level, data))


def legacy(session: Session) -> Any:
    return SimpleNamespace(protocol_version="2025-11-25", session=session, request_id=7)


def denied() -> Call:
    call = Call(tool_name="echo", arguments={}, identity=None, run=RunInfo(run_id="r"))
    from dataclasses import replace

    return replace(call, error=Denied("policy", "no"))


async def test_a_2025_session_hears_from_the_level_it_set_and_nothing_before() -> None:
    levels, session = LogLevels(), Session()
    await levels.decided(legacy(session), denied())
    assert session.sent == []  # no logging/setLevel yet
    await levels.set_level(legacy(session), SimpleNamespace(level="error"))  # type: ignore[arg-type]
    await levels.decided(legacy(session), denied())
    assert session.sent == []  # a refusal is a warning, below error
    await levels.set_level(legacy(session), SimpleNamespace(level="info"))  # type: ignore[arg-type]
    await levels.decided(legacy(session), denied())
    assert [(level, data["stage"], data["reasons"]) for level, data in session.sent] == [("warning", "policy", ["no"])]


async def test_a_request_without_an_sdk_context_gets_nothing_and_nothing_fails() -> None:
    fast_path = SimpleNamespace(request=None, session=None, method="tools/call", params={}, request_id=1)
    await LogLevels().decided(fast_path, denied())  # the edge's fast path: no protocol version, no session
