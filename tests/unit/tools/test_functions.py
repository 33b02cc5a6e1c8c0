"""Catalog functions as tools: schemas from signatures, and the sandbox's limits."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
