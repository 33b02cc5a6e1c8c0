"""A real `mlflow server` that times out on the shipper's batches: the batch halves until the server
copes, grows back, and every call arrives exactly once; and the one-span trace form it ingests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from bench.audit import arrived, fill
from server.audit.keys import ChainKey
from server.audit.mlflow_target import MlflowTarget
from server.audit.outbox import SqliteOutbox
from server.audit.shipper import Shipper
from server.audit.traces import TracePlan
from server.metrics import Metrics
from server.settings import AuditSettings
from tests.gateway_process import free_port
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


class Recorded(MlflowTarget):
    """The real target, recording the size of each batch it was asked to write."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        super().__init__(tracking_uri, experiment)
        self.sizes: list[int] = []

    def write(self, plans: Sequence[TracePlan]) -> None:
        self.sizes.append(len(plans))
        super().write(plans)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    root.mkdir()
    server = MlflowServer(root, free_port())
    try:
        server.start(600)  # minutes on a loaded machine
        yield server
    finally:
        server.stop()


async def _ship_all(shipper: Shipper, outbox: SqliteOutbox, seconds: float) -> None:
    shipper.start()
    deadline = time.monotonic() + seconds
    while (await outbox.backlog())[0] and time.monotonic() < deadline:  # noqa: ASYNC110 - the shipper is a task
        await asyncio.sleep(0.2)
    await shipper.stop(drain_seconds=0)


@pytest.mark.timeout(900)
async def test_timeouts_halve_the_batch_and_every_call_arrives_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ChainKey.generate()
    ids = await fill(tmp_path / "audit.db", key, 400)
    outbox = SqliteOutbox(tmp_path / "audit.db", key=key)
    with mlflow_server(tmp_path / "mlflow") as server:
        # A 1 s request timeout against ~15-30 ms of server CPU per trace: a batch of 400 cannot pass.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
        target = Recorded(server.url, "castellan-audit")
        settings = AuditSettings(ship_batch=400, ship_interval_seconds=0.1, ship_backoff_max_seconds=2)
        shipper = Shipper(outbox, target, settings, Metrics())
        await _ship_all(shipper, outbox, 600)
        assert (await outbox.backlog())[0] == 0
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # for the search that counts them
        got = await asyncio.to_thread(arrived, server.url, "castellan-audit")
    await outbox.close()
    assert target.sizes[0] == 400
    assert target.sizes[1] == 200  # halved at once after the timeout
    assert min(target.sizes) <= 100
    assert sorted(got) == sorted(ids)  # none lost, none twice (a timed-out batch may have landed too)


@pytest.mark.timeout(600)
async def test_the_one_span_form_arrives_with_its_stages_and_tags(tmp_path: Path) -> None:
    from mlflow.tracing.client import TracingClient

    key = ChainKey.generate()
    ids = await fill(tmp_path / "audit.db", key, 20)
    outbox = SqliteOutbox(tmp_path / "audit.db", key=key)
    with mlflow_server(tmp_path / "mlflow") as server:
        target = MlflowTarget(server.url, "castellan-audit")
        shipper = Shipper(outbox, target, AuditSettings(mlflow_spans="call"), Metrics())
        await _ship_all(shipper, outbox, 300)
        got = await asyncio.to_thread(arrived, server.url, "castellan-audit")
        trace = await asyncio.to_thread(TracingClient(server.url).get_trace, _trace_id(ids[0]))
    await outbox.close()
    assert sorted(got) == sorted(ids)
    assert len(trace.data.spans) == 1
    stages = trace.data.spans[0].attributes["castellan.stages"]
    assert {"policy", "tool", "audit"} <= set(stages)
    assert trace.info.tags["castellan.call_id"] == ids[0]
    assert trace.info.tags["castellan.decision"] == "allow"


def _trace_id(call_id: str) -> str:
    from server.audit.traces import trace_id_for

    return trace_id_for(call_id)
