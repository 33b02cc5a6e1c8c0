"""Catalog functions as tools: schemas from signatures, and the sandbox's limits."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tools.functions import FunctionTool, FunctionWorkers, load_functions

pytestmark = pytest.mark.anyio


@pytest.fixture
async def workers() -> AsyncIterator[FunctionWorkers]:
    pool = FunctionWorkers(workers=1, memory_mb=256)
    yield pool
    await pool.aclose()


def tool(name: str, workers: FunctionWorkers, **limits: float) -> FunctionTool:
    found = {f.name: f for f in load_functions(["tools.demo_functions", "tests.fixtures.functions"])}
    return FunctionTool(found[name], workers, **limits)  # type: ignore[arg-type]


def test_the_schema_comes_from_the_signature_and_docstring() -> None:
    spec = tool("main.tools.apply_discount", FunctionWorkers()).spec
    assert spec.description == "Price after a percentage discount, rounded to cents."
    assert spec.input_schema["required"] == ["price"]
    assert spec.input_schema["properties"]["percent"] == {
        "default": 10.0,
        "type": "number",
        "description": "The discount in percent (0-100).",
    }
    assert spec.output_schema == {
        "type": "object",
        "properties": {"result": {"type": "number"}},
        "required": ["result"],
    }
    assert spec.securable == "main.tools.apply_discount"


async def test_a_call_runs_in_the_worker_with_typed_arguments(workers: FunctionWorkers) -> None:
    out = await tool("main.tools.days_between", workers).invoke({"start": "2026-01-01", "end": "2026-03-01"})
    assert out.structured == {"result": 59}
    failed = await tool("main.tools.apply_discount", workers).invoke({"price": 10.0, "percent": 150})
    assert failed.is_error
    assert "percent must be between 0 and 100" in failed.text


async def test_runaway_functions_are_stopped_and_the_next_call_works(workers: FunctionWorkers) -> None:
    slow = await tool("main.tests.sleep", workers, timeout_seconds=0.5).invoke({"seconds": 30})
    assert slow.is_error
    assert "timed out after 0.5 s" in slow.text
    spinning = await tool("main.tests.spin", workers, timeout_seconds=30, cpu_seconds=1).invoke({"seconds": 20})
    assert spinning.is_error
    assert "resource limits" in spinning.text
    hungry = await tool("main.tests.hog", workers).invoke({"megabytes": 2048})
    assert hungry.is_error
    fine = await tool("main.tools.apply_discount", workers).invoke({"price": 200.0})
    assert fine.structured == {"result": 180.0}


def _descends_from_us(pid: str) -> bool:
    """The process is a descendant of this test process (other test runs on the machine are not ours)."""
    me = str(os.getpid())
    for _ in range(64):
        try:
            pid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            return False
        if pid == me:
            return True
        if pid in ("0", "1"):
            return False
    return False


def _sleep_workers() -> int:
    """This test's sandboxed `main.tests.sleep` workers still alive."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tests.fixtures.functions" in argv and b"sleep" in argv and b"-I" in argv:
            count += _descends_from_us(cmdline.parent.name)
    return count


async def _no_sleep_workers_within(seconds: float) -> bool:
    """A killed worker is reaped asynchronously: wait (bounded) for it to be gone."""
    deadline = time.monotonic() + seconds
    while _sleep_workers() and time.monotonic() < deadline:  # noqa: ASYNC110 - polling /proc, no event to wait on
        await asyncio.sleep(0.05)
    return _sleep_workers() == 0


async def test_a_cancelled_call_ends_its_worker_and_leaves_the_others(workers: FunctionWorkers) -> None:
    nap = tool("main.tests.sleep", workers, timeout_seconds=30)
    call = asyncio.ensure_future(nap.invoke({"seconds": 30}))
    await asyncio.sleep(3)  # the worker has started and is sleeping
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await _no_sleep_workers_within(5.0)  # the cancelled call's sandbox is gone, not left sleeping
    fine = await tool("main.tools.apply_discount", workers).invoke({"price": 100.0})
    assert fine.structured == {"result": 90.0}
    again = await tool("main.tests.sleep", workers).invoke({"seconds": 0})
    assert again.structured == {"result": "awake"}


async def test_one_agents_slow_calls_leave_a_worker_for_another_agent() -> None:
    from server.invoke import caller
    from tests.fakes.backends import make_identity

    pool = FunctionWorkers(workers=2, memory_mb=256, per_identity=1)
    finished: list[str] = []

    async def call(agent: str, seconds: float) -> None:
        caller.set(make_identity(agent_id=agent))
        out = await tool("main.tests.sleep", pool, timeout_seconds=60).invoke({"seconds": seconds})
        assert out.structured == {"result": "awake"}
        finished.append(agent)

    try:
        slow = [asyncio.ensure_future(call("slow-agent", 4)) for _ in range(3)]
        await asyncio.sleep(0.5)
        await call("quick-agent", 0)
        assert finished == ["quick-agent"]  # answered while the slow agent's calls wait their turn
        await asyncio.gather(*slow)
    finally:
        await pool.aclose()
