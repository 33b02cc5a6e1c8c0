"""The audit trail reaches a real `mlflow server`: every call exactly once, through an MLflow crash."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from bench.load import call_body, call_headers
from tests.gateway_process import GatewayProcess, run_gateway
from tests.mlflow_server import run_mlflow

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def shipping_env(tracking_uri: str) -> dict[str, str]:
    return {
        "CASTELLAN_AUDIT__SHIP": "true",
        "CASTELLAN_AUDIT__MLFLOW_TRACKING_URI": tracking_uri,
        "CASTELLAN_AUDIT__SHIP_INTERVAL_SECONDS": "0.2",
        "CASTELLAN_AUDIT__SHIP_BACKOFF_MAX_SECONDS": "2",
        "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
        "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
        "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


async def drive(gw: GatewayProcess, token: str, first: int, count: int, concurrency: int = 8) -> list[bool]:
    """`count` calls: echo with distinct text, and every tenth `demo.reset` (denied: destructive)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(first, first + count):
        queue.put_nowait(i)
    outcomes: list[bool] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            tool, args = ("demo.reset", {}) if i % 10 == 0 else ("echo", {"text": f"call {i}"})
            async with session.post(
                gw.mcp_url, data=call_body(tool, args, i), headers=call_headers(tool, token)
            ) as resp:
                assert resp.status == 200, await resp.text()
                outcomes.append(not (await resp.json())["result"].get("isError", False))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return outcomes


async def metric(gw: GatewayProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{gw.base_url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def until(condition: Callable[[], Awaitable[bool]], seconds: float) -> None:
    """Polls `condition` (state of another process) until true or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not await condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - another process
        await asyncio.sleep(0.3)


def mlflow_call_ids(tracking_uri: str) -> list[str]:
    """The `castellan.call_id` of every trace in the audit experiment, paging through all of them."""
    from mlflow.tracing.client import TracingClient
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment_by_name("castellan-audit")
    assert experiment is not None
    client = TracingClient(tracking_uri)
    ids: list[str] = []
    token = None
    while True:
        page = client.search_traces(
            locations=[experiment.experiment_id], max_results=500, page_token=token, include_spans=False
        )
        ids += [t.info.tags["castellan.call_id"] for t in page]
        token = page.token
        if not token:
            return ids


@pytest.mark.timeout(600)  # ~20-30 traces/s is what an SQLite-backed mlflow server takes here
async def test_every_call_reaches_mlflow_exactly_once_across_an_mlflow_crash(tmp_path: Path) -> None:
    with (
        run_mlflow(tmp_path / "mlflow") as mlflow,
        run_gateway(tmp_path / "gw", shipping_env(mlflow.url), timeout=60) as gw,
    ):
        token = gw.token("audit-load", groups=["analysts"])
        done = await drive(gw, token, 0, 800)
        mlflow.kill()  # a crash, mid-shipping: most of the first 800 are not shipped yet
        done += await drive(gw, token, 800, 600)

        async def failed() -> bool:
            return await metric(gw, "castellan_audit_ship_failures") > 0

        await until(failed, 30)
        assert await failed(), "the shipper did not notice MLflow was down"
        async with aiohttp.ClientSession() as session, session.get(f"{gw.base_url}/readyz") as resp:
            assert (await resp.json())["checks"]["audit_shipping"] == "ok"  # lag is reported, not fatal
        assert await metric(gw, "castellan_audit_unshipped_records") > 0
        mlflow.start()  # same port, same store
        done += await drive(gw, token, 1400, 600)
        assert done.count(True) == 1800
        assert done.count(False) == 200

        async def drained() -> bool:
            unshipped = await metric(gw, "castellan_audit_unshipped_records")
            return unshipped == 0 and await metric(gw, "castellan_audit_shipped_calls") >= 2000

        await until(drained, 300)
        assert await drained(), gw.log()[-3000:]

        with sqlite3.connect(gw.data_dir / "audit.db") as db:
            outbox_ids = {row[0] for row in db.execute("SELECT DISTINCT call_id FROM outbox")}
        shipped = mlflow_call_ids(mlflow.url)
        assert len(outbox_ids) == 2000
        assert len(shipped) == len(set(shipped)), "a call was shipped as two traces"
        assert set(shipped) == outbox_ids, (
            f"missing in MLflow: {len(outbox_ids - set(shipped))}, unknown: {len(set(shipped) - outbox_ids)}"
        )
