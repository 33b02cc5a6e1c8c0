"""A governed call leaves no reference cycles of the gateway's (or the MCP SDK's) objects behind, in
either protocol era: its objects are freed by reference counting when the request is done with them,
not by the cyclic collector (server/heap.py relies on it). A call that made a cycle (a closure calling
itself, an object and its back-reference) put ~50 objects a call on the collector before."""

from __future__ import annotations

import gc
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from server import heap
from server.app import create_app
from server.auth.devkeys import mint_dev_token
from server.settings import Settings
from tests.mcp_wire import ENVELOPE, HEADERS, MODERN, open_session

OURS = ("server.", "tools.", "mcp.", "mcp_types")  # the gateway's modules and the SDK it drives
CALLS = 12


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False},
        policy={"engine": "embedded", "reload": False, "decision_log": True},
    )
    token = mint_dev_token(
        settings.data_dir, agent="garbage", issuer=settings.issuer, audience=settings.resource_url, groups=["analysts"]
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8750") as client:
        yield client, token


def _module(obj: Any) -> str:
    if isinstance(obj, types.FunctionType | types.MethodType):
        return str(getattr(obj, "__module__", "") or "")
    if isinstance(obj, types.CellType):
        try:
            return _module(obj.cell_contents)
        except ValueError:  # an empty cell
            return ""
    return type(obj).__module__


def cyclic_garbage_of_ours(calls: Callable[[], None]) -> list[str]:
    """What `calls` left that only the cyclic collector frees, of the gateway's or the SDK's making."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept in gc.garbage, to read
    try:
        calls()
        gc.collect()
        return sorted({f"{_module(o)}.{type(o).__qualname__}" for o in gc.garbage if _module(o).startswith(OURS)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_2026_call_leaves_no_cycles(gateway: tuple[TestClient, str]) -> None:
    client, token = gateway
    headers = {
        **HEADERS,
        "authorization": f"Bearer {token}",
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "echo",
    }

    def calls() -> None:
        for i in range(CALLS):
            params = {"name": "echo", "arguments": {"text": f"call {i}"}, "_meta": ENVELOPE}
            resp = client.post("/mcp", json={"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params},
                               headers=headers)  # fmt: skip
            assert resp.status_code == 200, resp.text
            assert resp.json()["result"]["isError"] is False

    calls()  # warm: what is made once (caches, compiled policies) is not a call's
    assert cyclic_garbage_of_ours(calls) == []


def test_a_call_on_a_2025_session_leaves_no_cycles(gateway: tuple[TestClient, str]) -> None:
    client, token = gateway
    headers = {**HEADERS, "authorization": f"Bearer {token}"}
    session = open_session(client, headers)
    served = client.app.state.edge.served  # type: ignore[attr-defined]

    def calls() -> None:
        for i in range(1, CALLS + 1):
            params = {"name": "echo", "arguments": {"text": f"call {i}"}}
            resp = client.post("/mcp", json={"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params},
                               headers=session)  # fmt: skip
            assert resp.status_code == 200, resp.text
            assert resp.json()["result"]["isError"] is False

    calls()
    assert cyclic_garbage_of_ours(calls) == []
    assert client.app.state.edge.served - served == 2 * CALLS  # type: ignore[attr-defined]  # the lean path


def test_settling_the_heap_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        heap.settle()
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
