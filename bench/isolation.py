"""What tool isolation costs per call, isolated against the unisolated way, in one run.
Writes bench/results/isolation.{json,md}.

    .venv/bin/python -m bench.isolation [--calls 300]

- `sql.query`: before, DuckDB in the gateway's process (a fresh in-memory connection per query on a
  thread, the Delta tables registered: the tool as it was); after, the sandboxed DuckDB workers.
- A catalog function (`main.tools.apply_discount`): before, a forkserver process pool with resource
  limits only (the tool as it was); after, bubblewrap workers kept per function, and a fresh sandbox
  per call (`function_calls_per_worker = 1`, a spare started ahead); plus the rlimits fallback mode.
- The start-up of one sandboxed worker (cold), which the warm pools hide.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.stats import percentile
from server.sandbox import detect_mode
from tools.demo_data import create_demo_data
from tools.demo_functions import apply_discount
from tools.functions import FunctionTool, FunctionWorkers, load_functions
from tools.sql_query import SqlQueryTool
from tools.sql_workers import SqlLimits
from tools.tables import TableCatalog

RESULTS = Path(__file__).parent / "results"
QUERIES = {
    "SELECT 1": "SELECT 1 AS one",
    "GROUP BY over orders": (
        "SELECT region, COUNT(*) AS n, SUM(amount) AS total FROM main.sales.orders GROUP BY region ORDER BY region"
    ),
}


class InProcessSql:
    """Baseline: the query run by DuckDB inside this process, as `sql.query` did before isolation."""

    def __init__(self, tool: SqlQueryTool, tables: TableCatalog) -> None:
        self._tool, self._tables = tool, tables

    def _run(self, sql: str) -> list[Any]:
        import duckdb

        checked = self._tool._check(sql)
        con = duckdb.connect(":memory:", config={"enable_external_access": False, "threads": 2})
        try:
            for index, name in enumerate(checked.tables):
                con.register(f"__t{index}", self._tables.open(name).to_pyarrow_dataset())
            con.execute("SET lock_configuration = true")
            return con.execute(checked.rewritten).fetchmany(101)
        finally:
            con.close()

    async def query(self, sql: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._run, sql)


def _limit(memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def _call_discount(price: float) -> float:
    return apply_discount.function(price)  # type: ignore[no-any-return]


async def _latencies(calls: int, one: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(min(20, calls)):
        await one()
    found = []
    for _ in range(calls):
        started = time.perf_counter()
        await one()
        found.append(time.perf_counter() - started)
    return found


async def _paired(
    calls: int, before: Callable[[], Awaitable[object]], after: Callable[[], Awaitable[object]]
) -> tuple[list[float], list[float]]:
    """Alternates the two, call by call, so a busy machine slows both alike."""
    for _ in range(min(20, calls)):
        await before()
        await after()
    found: tuple[list[float], list[float]] = ([], [])
    for _ in range(calls):
        for index, one in enumerate((before, after)):
            started = time.perf_counter()
            await one()
            found[index].append(time.perf_counter() - started)
    return found


def _row(kind: str, variant: str, latencies: list[float], baseline: list[float] | None = None) -> dict[str, Any]:
    """One line of the table; `ratio` is the p50 against the baseline measured alternately with it."""
    p50 = percentile(latencies, 0.5)
    return {
        "tool": kind,
        "variant": variant,
        "calls": len(latencies),
        "p50_ms": p50 * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "ratio": p50 / percentile(baseline, 0.5) if baseline else 1.0,
    }


async def run(calls: int) -> dict[str, Any]:
    mode = detect_mode("auto")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "delta"
        create_demo_data(root)
        tables = TableCatalog(root)
        tool = SqlQueryTool(tables, Path(tmp) / "spill", SqlLimits(workers=1), mode=mode)
        before = InProcessSql(tool, tables)
        for label, sql in QUERIES.items():

            async def in_process(sql: str = sql) -> None:
                await before.query(sql)

            async def isolated(sql: str = sql) -> None:
                out = await tool.invoke({"query": sql})
                assert not out.is_error, out.text

            was, now = await _paired(calls, in_process, isolated)
            rows.append(_row(f"sql.query: {label}", "before: in-process", was))
            rows.append(_row(f"sql.query: {label}", f"after: {mode.name} worker", now, was))
        await tool.aclose()

    name = "main.tools.apply_discount"
    function = {f.name: f for f in load_functions(["tools.demo_functions"])}[name]
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("forkserver"), initializer=_limit, initargs=(512 << 20,)
    )
    loop = asyncio.get_running_loop()

    async def unisolated() -> None:
        await loop.run_in_executor(pool, _call_discount, 100.0)

    variants = [(f"after: {mode.name} workers (kept)", mode, 0)]
    if mode.isolated:
        variants.append(("after: rlimits fallback (kept)", detect_mode("rlimits"), 0))
    variants.append((f"after: {mode.name}, fresh sandbox per call", mode, 1))
    for variant, variant_mode, per_worker in variants:
        workers = FunctionWorkers(1, 512, mode=variant_mode, calls_per_worker=per_worker)
        fn_tool = FunctionTool(function, workers)

        async def call(fn_tool: FunctionTool = fn_tool) -> None:
            out = await fn_tool.invoke({"price": 100.0})
            assert not out.is_error, out.text

        was, now = await _paired(calls if per_worker != 1 else max(10, calls // 10), unisolated, call)
        rows.append(_row(name, "before: forkserver pool, rlimits", was))
        rows.append(_row(name, variant, now, was))
        await workers.aclose()
    pool.shutdown()

    starts = []
    for _ in range(5):
        cold = FunctionWorkers(1, 512, mode=mode)
        started = time.perf_counter()
        out = await FunctionTool(function, cold).invoke({"price": 100.0})
        starts.append(time.perf_counter() - started)
        assert not out.is_error, out.text
        await cold.aclose()
    return {"mode": mode.describe(), "rows": rows, "sandbox_start_ms_p50": percentile(starts, 0.5) * 1e3}


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Sandbox here: {result['mode']}. Sequential calls at the tool (no HTTP, no pipeline stages), "
        "latency per call; each `after` row alternated call by call with the `before` row above it (so load "
        "slows both alike), and its ratio is its p50 over that baseline's.",
        "",
        "| tool | variant | calls | p50 ms | p99 ms | p50 ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        timing = f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['ratio']:.2f}x"
        lines.append(f"| {r['tool']} | {r['variant']} | {r['calls']} | {timing} |")
    lines += ["", f"The first call of a function (a sandboxed worker started: bubblewrap, Python, its imports): "
              f"{result['sandbox_start_ms_p50']:.0f} ms p50; kept workers and the spare hide it."]  # fmt: skip
    return "# Tool isolation: cost per call\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    result = asyncio.run(run(parser.parse_args().calls))
    markdown = _markdown(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "isolation.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "isolation.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
