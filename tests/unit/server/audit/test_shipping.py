"""The shipper: what it ships when, and that an unreachable MLflow delays records but never loses them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from server.audit.checkpoints import Checkpoint
from server.audit.keys import ChainKey
from server.audit.outbox import PendingCall, SqliteOutbox, interrupted_outcome
from server.audit.redaction import Redactor
from server.audit.shipper import Shipper, ShipperBusy
from server.audit.traces import TracePlan, plan_trace, trace_id_for
from server.metrics import Metrics
from server.settings import AuditSettings

pytestmark = pytest.mark.anyio
KEY = ChainKey.generate()


class FlakyTarget:
    """Stands in for MLflow (a real server is used by the integration test): fails while `down`."""

    tracking_uri = "memory://"
    is_local = False

    def __init__(self) -> None:
        self.down = False
        self.traces: dict[str, TracePlan] = {}
        self.writes = 0
        self.checkpoints: list[Checkpoint] = []

    def experiment_id(self) -> str:
        if self.down:
            raise ConnectionError("connection refused")
        return "1"

    def write(self, plans: Sequence[TracePlan]) -> None:
        if self.down:
            raise ConnectionError("connection refused")
        self.writes += 1
        for plan in plans:
            self.traces[plan.trace_id] = plan  # keyed like MLflow: a re-ship overwrites

    def write_checkpoints(self, checkpoints: Sequence[Checkpoint]) -> None:
        if self.down:
            raise ConnectionError("connection refused")
        self.checkpoints += checkpoints


def decision(call_id: str, verdict: str = "allow") -> dict[str, object]:
    return {
        "call_id": call_id,
        "time": "2026-11-24T09:00:00+00:00",
        "tool": "echo",
        "agent_id": "a1",
        "decision": verdict,
        "stage": None if verdict == "allow" else "policy",
        "reasons": [] if verdict == "allow" else ["not allowed"],
        "arguments": {"text": "hi"},
        "run_id": "r1",
        "timings_ms": {"authenticate": 0.1, "policy": 0.3},
    }


def outcome(call_id: str) -> dict[str, object]:
    return {
        "call_id": call_id,
        "is_error": False,
        "result_preview": "hi",
        "latency_ms": 2.5,
        "timings_ms": {"authenticate": 0.1, "policy": 0.3, "record": 0.2, "invoke": 1.0, "audit": 0.4},
    }


async def test_only_finished_calls_are_shipped_and_unfinished_ones_never_hold_them_back(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    for i in range(150):  # more running calls than a batch, ahead of the finished ones
        await outbox.write("decision", f"running{i}", decision(f"running{i}"))
    await outbox.write("decision", "done", decision("done"))
    await outbox.write("outcome", "done", outcome("done"))
    await outbox.write("decision", "denied", decision("denied", "deny"))

    ready = {p.call_id for p in await outbox.pending(100)}
    assert ready == {"done", "denied"}
    unfinished = await outbox.unfinished(older_than=0)
    assert unfinished.count == 150
    assert unfinished.call_ids[0] == "running0"
    assert (await outbox.unfinished(older_than=3600)).count == 0
    await outbox.close()


async def test_records_wait_while_mlflow_is_down_and_ship_once_it_is_back(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    target = FlakyTarget()
    metrics = Metrics()
    settings = AuditSettings(ship_interval_seconds=0.05, ship_backoff_max_seconds=0.2, ship_batch=7)
    shipper = Shipper(outbox, target, settings, metrics)  # type: ignore[arg-type]
    target.down = True
    shipper.start()
    for i in range(30):
        await outbox.write("decision", f"c{i}", decision(f"c{i}", "deny" if i % 5 == 0 else "allow"))
        if i % 5:
            await outbox.write("outcome", f"c{i}", outcome(f"c{i}"))
    await asyncio.sleep(0.5)
    assert target.traces == {}
    assert shipper.last_error is not None
    assert "connection refused" in shipper.last_error
    assert (await shipper.lag())["unshipped"] == 54

    target.down = False
    with anyio.fail_after(10):
        while (await outbox.backlog())[0]:  # noqa: ASYNC110 - the shipper is a task, its progress is the outbox
            await asyncio.sleep(0.05)
    assert {p.call_id for p in target.traces.values()} == {f"c{i}" for i in range(30)}
    assert target.writes >= 5  # batches of 7
    await shipper.stop()
    await outbox.close()


def test_a_trace_has_a_span_per_stage_and_the_identity_and_decision_as_tags() -> None:
    plan = plan_trace(PendingCall("c1", [1, 2], decision("c1"), 0.0, outcome("c1")))
    assert plan.trace_id == trace_id_for("c1")  # the same call always maps to the same trace
    assert [s.name for s in plan.spans] == ["call echo", "authenticate", "policy", "record", "tool", "audit"]
    assert plan.ok
    assert plan.metadata["mlflow.trace.user"] == "a1"  # the agent is MLflow's user of the trace
    assert plan.tags["castellan.decision"] == "allow"
    assert plan.spans[4].inputs == {"text": "hi"}
    starts = [s.start_ns for s in plan.spans[1:]]
    assert starts == sorted(starts)
    assert all(s.end_ns <= plan.end_ns for s in plan.spans)

    denied = plan_trace(PendingCall("c2", [3], decision("c2", "deny"), 0.0, None))
    assert not denied.ok
    assert [s.name for s in denied.spans] == ["call echo", "authenticate", "policy"]
    assert denied.spans[2].ok is False  # the stage that stopped the call
    assert "not allowed" in denied.response_preview


def test_redaction_of_named_fields_and_secret_patterns() -> None:
    redactor = Redactor(["password", "Token"], [r"sk-[A-Za-z0-9]{16,}"])
    value = {
        "user": "ann",
        "PASSWORD": "hunter2",
        "nested": [{"token": "abc"}, "key sk-ABCDEFGHIJKLMNOPQRST here"],
    }
    assert redactor.apply(value) == {
        "user": "ann",
        "PASSWORD": "[REDACTED]",
        "nested": [{"token": "[REDACTED]"}, "key [REDACTED] here"],
    }
    assert redactor.with_fields(["user"]).apply(value)["user"] == "[REDACTED]"


async def test_a_second_shipper_on_the_same_outbox_is_refused(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    first = Shipper(outbox, FlakyTarget(), AuditSettings(), Metrics())  # type: ignore[arg-type]
    second = Shipper(outbox, FlakyTarget(), AuditSettings(), Metrics())  # type: ignore[arg-type]
    first.lock.acquire()
    with pytest.raises(ShipperBusy, match=f"another shipper \\(pid {os.getpid()}\\)"):
        second.lock.acquire()
    first.lock.release()
    second.lock.acquire()  # the lock goes with its holder
    second.lock.release()
    await outbox.close()


async def test_the_shipper_survives_a_status_file_it_cannot_write_and_reports_it(tmp_path: Path) -> None:
    """As on a full disk: writing the status file fails every time; shipping goes on, and says so."""
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    target, metrics = FlakyTarget(), Metrics()
    settings = AuditSettings(ship_interval_seconds=0.05)
    unwritable = tmp_path / "missing-dir" / "shipper-status.json"
    shipper = Shipper(outbox, target, settings, metrics, status_file=unwritable)  # type: ignore[arg-type]
    shipper.start()
    for i in range(5):
        await outbox.write("decision", f"c{i}", decision(f"c{i}", "deny"))
    with anyio.fail_after(10):
        while (await outbox.backlog())[0]:  # noqa: ASYNC110 - the shipper is a task, its progress is the outbox
            await asyncio.sleep(0.05)
    for i in range(5, 8):  # and still shipping after the fault, many cycles later
        await outbox.write("decision", f"c{i}", decision(f"c{i}", "deny"))
    with anyio.fail_after(10):  # shipped, and that cycle's status write failed too (it follows the write)
        while len(target.traces) < 8 or shipper.errors < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert metrics.shipper_errors.labels("status")._value.get() == shipper.errors  # all of them: the status file
    assert (await shipper.status()).startswith("degraded: shipper: status: FileNotFoundError")
    await shipper.stop()
    await outbox.close()


def test_an_interrupted_call_is_an_error_trace_and_an_unfinished_one_is_not_shipped_as_ok() -> None:
    cut = plan_trace(PendingCall("c1", [1, 2], decision("c1"), 0.0, interrupted_outcome("c1", "i1", "i2")))
    assert not cut.ok
    assert cut.tags["castellan.outcome"] == "interrupted"
    assert cut.tags["castellan.flags"] == "interrupted"
    fine = plan_trace(PendingCall("c2", [3, 4], decision("c2"), 0.0, outcome("c2")))
    assert (fine.ok, fine.tags["castellan.outcome"]) == (True, "ok")


async def test_signed_checkpoints_are_shipped_once(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "audit.db", key=KEY)
    target = FlakyTarget()
    shipper = Shipper(outbox, target, AuditSettings(), Metrics())  # type: ignore[arg-type]
    await outbox.write("decision", "c1", decision("c1", "deny"))
    outbox.record_head()
    assert await shipper.ship_checkpoints() == 1
    assert await shipper.ship_checkpoints() == 0
    await outbox.write("decision", "c2", decision("c2", "deny"))
    outbox.record_head()
    assert await shipper.ship_checkpoints() == 1
    assert [(cp.seq, cp.valid(KEY)) for cp in target.checkpoints] == [(1, True), (2, True)]
    await outbox.close()
