"""The shipper's batch: it halves when the tracking server times out or refuses a request's size,
grows back after confirmed writes, and neither loses nor repeats a call; and the one-span trace form."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest

from server.audit.checkpoints import Checkpoint
from server.audit.keys import ChainKey
from server.audit.mlflow_target import BatchTooLarge
from server.audit.outbox import PendingCall, SqliteOutbox
from server.audit.shipper import Shipper
from server.audit.traces import TracePlan, as_one_span, plan_trace
from server.metrics import Metrics
from server.settings import AuditSettings
from tests.unit.server.audit.test_shipping import decision, outcome

KEY = ChainKey.generate()


class SizeLimitedTarget:
    """Stands in for a tracking server that times out on batches above `limit` calls (a real
    `mlflow server` is used by tests/integration/test_ship_batch_mlflow.py). Like a timeout, the
    refused batch may have been written anyway (`write_refused`): re-shipping must not duplicate."""

    tracking_uri = "memory://"
    is_local = False

    def __init__(self, limit: int, write_refused: bool = True) -> None:
        self.limit = limit
        self.write_refused = write_refused
        self.arrivals: list[str] = []
        self.traces: dict[str, TracePlan] = {}
        self.sizes: list[int] = []

    def experiment_id(self) -> str:
        return "1"

    def write(self, plans: Sequence[TracePlan]) -> None:
        self.sizes.append(len(plans))
        if len(plans) > self.limit:
            if self.write_refused:
                for plan in plans:
                    self.traces[plan.trace_id] = plan
            raise BatchTooLarge(f"timed out on {len(plans)} calls")
        for plan in plans:
            self.arrivals.append(plan.call_id)
            self.traces[plan.trace_id] = plan  # keyed like MLflow: a re-ship upserts

    def write_checkpoints(self, checkpoints: Sequence[Checkpoint]) -> None:
        pass


async def _fill(outbox: SqliteOutbox, calls: int) -> set[str]:
    for i in range(calls):
        await outbox.write("decision", f"c{i}", decision(f"c{i}"))
        await outbox.write("outcome", f"c{i}", outcome(f"c{i}"))
    return {f"c{i}" for i in range(calls)}


@pytest.mark.anyio
async def test_the_batch_halves_on_a_timeout_and_every_call_arrives_once(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    ids = await _fill(outbox, 300)
    target = SizeLimitedTarget(limit=40)
    shipper = Shipper(outbox, target, AuditSettings(ship_batch=200, ship_interval_seconds=0.05), Metrics())  # type: ignore[arg-type]
    shipper.start()
    with anyio.fail_after(20):
        while (await outbox.backlog())[0]:  # noqa: ASYNC110 - the shipper is a task, its progress is the outbox
            await asyncio.sleep(0.02)
    await shipper.stop()
    await outbox.close()
    assert target.sizes[:4] == [200, 100, 50, 25]  # halved at once, not after a back-off
    assert max(target.sizes[4:]) <= 50  # grows back to 50, is refused, halves again
    assert sorted(target.arrivals) == sorted(ids)  # each confirmed exactly once
    assert {p.call_id for p in target.traces.values()} == ids
    assert "timed out" in (shipper.last_error or "") or shipper.last_error is None


@pytest.mark.anyio
async def test_a_shrunk_batch_grows_back_to_the_configured_size_once_the_server_copes(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    await _fill(outbox, 10)
    target = SizeLimitedTarget(limit=2)
    shipper = Shipper(outbox, target, AuditSettings(ship_batch=8), Metrics())  # type: ignore[arg-type]
    with pytest.raises(BatchTooLarge):
        await shipper.ship_once()
    assert shipper.batch == 4
    with pytest.raises(BatchTooLarge):
        await shipper.ship_once()
    assert shipper.batch == 2
    target.limit = 1000  # the server recovered
    await _fill_more(outbox, 20)
    for _ in range(12):
        await shipper.ship_once()
    assert shipper.batch == 8
    await shipper.stop(drain_seconds=0)
    await outbox.close()


async def _fill_more(outbox: SqliteOutbox, calls: int) -> None:
    for i in range(calls):
        await outbox.write("decision", f"m{i}", decision(f"m{i}"))
        await outbox.write("outcome", f"m{i}", outcome(f"m{i}"))


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A loopback HTTP server answering every POST with the status the test sets."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.server.status:  # type: ignore[attr-defined]
            time.sleep(3)  # never answers within the client's timeout
            return
        self.send_response(int(self.server.status))  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [413, 408, 504])
def test_a_refused_size_or_a_gateway_timeout_asks_for_a_smaller_batch(
    refusing_server: http.server.HTTPServer, status: int
) -> None:
    from mlflow.utils.rest_utils import MlflowHostCreds

    from server.audit import otlp

    refusing_server.status = status  # type: ignore[attr-defined]
    creds = MlflowHostCreds(f"http://127.0.0.1:{refusing_server.server_address[1]}")
    with pytest.raises(BatchTooLarge, match=str(status)):
        otlp.post(creds, "1", b"\x00" * 100)


def test_a_read_timeout_asks_for_a_smaller_batch(
    refusing_server: http.server.HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.utils.rest_utils import MlflowHostCreds

    from server.audit import otlp

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    refusing_server.status = 0  # type: ignore[attr-defined]
    creds = MlflowHostCreds(f"http://127.0.0.1:{refusing_server.server_address[1]}")
    with pytest.raises(BatchTooLarge, match="timed out"):
        otlp.post(creds, "1", b"\x00" * 100)


def test_another_error_from_the_server_is_not_taken_for_a_batch_size(refusing_server: http.server.HTTPServer) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import MlflowHostCreds

    from server.audit import otlp

    refusing_server.status = 400  # type: ignore[attr-defined]
    creds = MlflowHostCreds(f"http://127.0.0.1:{refusing_server.server_address[1]}")
    with pytest.raises(MlflowException) as raised:
        otlp.post(creds, "1", b"\x00" * 100)
    assert not isinstance(raised.value, BatchTooLarge)


def test_the_one_span_form_keeps_every_stage_and_the_tags() -> None:
    denied = {**decision("c1", "deny"), "stage": "policy"}
    plan = plan_trace(PendingCall("c1", [1], denied, 0.0, None))
    one = as_one_span(plan)
    assert len(plan.spans) > 1
    assert len(one.spans) == 1
    stages = (one.spans[0].attributes or {})["castellan.stages"]
    assert set(stages) == {sp.name for sp in plan.spans[1:]}
    assert stages["policy"]["ok"] is False
    assert stages["policy"]["outputs"]["reasons"] == ["not allowed"]
    assert one.tags == plan.tags
    assert one.metadata == plan.metadata
    assert one.trace_id == plan.trace_id
