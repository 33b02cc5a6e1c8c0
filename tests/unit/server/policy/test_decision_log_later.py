"""The policy stage's decision-log line is written off the call's path (`DecisionLog.emit_later`): the
same line as one written at once (its time the decision's, masked and redacted), every decision
exactly once and in order, a failure counted and never raised, and everything written by `close`."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from server.after_response import answering
from server.audit.records import decision_record
from server.audit.redaction import REDACTED, Redactor
from server.call import RunInfo
from server.policy._input import build_input, recorded_input
from server.policy.bundle import PolicyBundle
from server.policy.decision_log import LATER_SECONDS, DecisionLog
from server.policy.engine import Decision
from server.policy.stage import PolicyStage
from server.settings import REPO_ROOT
from tests.fakes.backends import StaticPolicy, make_call

pytestmark = pytest.mark.anyio
BUNDLE = PolicyBundle.from_directory(REPO_ROOT / "policies")


def log_in(
    path: Path, redactor: Redactor | None = None, bundle: PolicyBundle = BUNDLE, flush_seconds: float = 3600
) -> DecisionLog:
    return DecisionLog(path, bundle, "castellan/gateway/decision", redactor, flush_seconds=flush_seconds)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def document() -> dict[str, Any]:
    return {"arguments": {"Password": "hunter2", "text": "hi", "note": "token=abcdef123456xyz"}, "tool": {"n": 1}}


def decision(n: int = 1) -> Decision:
    return Decision(allow=True, reasons=("ok",), policy_version="v1", engine="embedded", decision_id=f"d{n}")


def _same_but_instance(line: dict[str, Any]) -> dict[str, Any]:
    return {**line, "labels": {**line["labels"], "id": "<instance>"}, "timestamp": "<time>"}


async def test_a_line_written_later_is_the_line_written_at_once(tmp_path: Path) -> None:
    now, later = log_in(tmp_path / "now.jsonl"), log_in(tmp_path / "later.jsonl")
    now.emit(document(), decision())
    before = time.time()
    later.emit_later(document(), decision())
    after = time.time()
    assert (tmp_path / "later.jsonl").read_text() == ""  # not built yet: the call goes on
    await asyncio.sleep(0.05)  # the decision is older than its line now
    now.close()
    later.close()
    [at_once], [written_later] = lines(tmp_path / "now.jsonl"), lines(tmp_path / "later.jsonl")
    assert _same_but_instance(written_later) == _same_but_instance(at_once)
    assert written_later["erased"] == ["/input/arguments/Password"]  # masked, as at once
    assert written_later["input"]["arguments"]["note"] == f"token={REDACTED}"  # redacted, as at once
    stamp = datetime.fromisoformat(written_later["timestamp"].replace("Z", "+00:00")).timestamp()
    assert before - 1e-6 <= stamp <= after + 1e-6  # the time of the decision, not of the write


async def test_lines_written_later_reach_the_file_within_the_bound_and_by_write_pending(tmp_path: Path) -> None:
    log = log_in(tmp_path / "d.jsonl", flush_seconds=0)  # each line to the file as it is written

    async def written(count: int) -> list[str]:
        for _ in range(100):  # bounded: LATER_SECONDS
            if len(lines(tmp_path / "d.jsonl")) >= count:
                break
            await asyncio.sleep(LATER_SECONDS)
        return [e["decision_id"] for e in lines(tmp_path / "d.jsonl")]

    log.emit_later(document(), decision(1))
    assert await written(1) == ["d1"]  # by the timer: nobody asked
    log.emit_later(document(), decision(2))
    log.write_pending()  # what the audit stage calls once the call is answered
    assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d1", "d2"]
    await asyncio.sleep(LATER_SECONDS * 3)  # nothing left for a timer: each line once
    assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d1", "d2"]
    log.emit_later(document(), decision(3))  # after write_pending, a line has its own bound again
    assert await written(3) == ["d1", "d2", "d3"]
    log.close()
    assert len(lines(tmp_path / "d.jsonl")) == 3


async def test_every_decision_is_logged_once_in_order_and_close_writes_those_still_waiting(tmp_path: Path) -> None:
    log = log_in(tmp_path / "d.jsonl")
    log.emit_later(document(), decision(1))
    log.emit_later(document(), decision(2))
    log.emit(document(), decision(3))  # written now, after those queued before it
    log.emit_later(document(), decision(4))
    log.emit_later(document(), decision(5))
    log.close()  # no turn of the loop in between: close writes them
    assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d1", "d2", "d3", "d4", "d5"]
    await asyncio.sleep(LATER_SECONDS * 3)
    assert len(lines(tmp_path / "d.jsonl")) == 5


async def test_a_line_that_fails_later_is_counted_and_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = log_in(tmp_path / "d.jsonl")
    write = log._write
    full = [True]

    def disk_full_once(line: bytes) -> None:
        if full.pop() if full else False:
            raise OSError(28, "No space left on device")
        write(line)

    monkeypatch.setattr(log, "_write", disk_full_once)
    log.emit_later(document(), decision(1))
    log.emit_later(document(), decision(2))
    await asyncio.sleep(0)
    log.write_pending()  # raises nothing
    log.close()
    assert log.failures == 1
    assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d2"]


async def test_a_line_is_masked_by_the_rules_in_force_at_its_decision(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "gateway.rego").write_text('package castellan.gateway\n\ndefault decision := {"allow": true}\n')
    log = log_in(tmp_path / "d.jsonl")
    log.emit_later(document(), decision(1))
    log.use(PolicyBundle.from_directory(plain))  # a reload without mask rules, before the line is built
    log.emit_later(document(), decision(2))
    log.close()
    first, second = lines(tmp_path / "d.jsonl")
    assert "Password" not in first["input"]["arguments"]  # the rules of its decision erased it
    assert second["input"]["arguments"]["Password"] == "hunter2"  # taken after the reload: no mask rules


async def test_without_a_running_loop_a_line_is_written_at_once(tmp_path: Path) -> None:
    log = log_in(tmp_path / "d.jsonl")

    def outside() -> None:
        log.emit_later(document(), decision(1))

    await asyncio.to_thread(outside)
    log.flush()
    assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d1"]
    log.close()


async def test_the_record_redacts_the_decision_input_once_for_itself_and_the_line_written_after_it(
    tmp_path: Path,
) -> None:
    redactor = Redactor()
    call = make_call(decision=Decision(allow=True, policy_version="v"), run=RunInfo(run_id="run token=abcdef123456xyz"))
    assert call.decision is not None
    log = log_in(tmp_path / "d.jsonl", redactor)
    given = build_input(call)
    log.emit_later(given, call.decision)
    record = decision_record(call, redactor)  # the record stage runs before the line is built
    event = log.event(build_input(call), Decision(allow=True, policy_version="v"))  # another decision: its own
    log.write_pending()
    log.close()
    [line] = lines(tmp_path / "d.jsonl")
    assert line["input"] == redactor.apply(build_input(call)) == event["input"]  # the same line as ever
    assert line["input"]["run"]["run_id"] == f"run token={REDACTED}"
    assert record["decision_input"] == redactor.apply(recorded_input(build_input(call)))
    assert redactor.kept(call.decision, recorded_input(build_input(call))) is None  # taken by the line, once


async def test_the_policy_stage_logs_its_decision_off_the_call(tmp_path: Path) -> None:
    log = log_in(tmp_path / "d.jsonl")
    stage = PolicyStage(StaticPolicy(Decision(allow=True, policy_version="static", decision_id="p1")), log)
    call = make_call(arguments={"q": "hello", "Password": "hunter2"})
    decided = await stage.run(call)
    assert decided.decision is not None
    assert decided.decision.allow
    assert (tmp_path / "d.jsonl").read_text() == ""  # not on the call's path
    log.close()
    [line] = lines(tmp_path / "d.jsonl")
    assert line["decision_id"] == "p1"
    assert "Password" not in line["input"]["arguments"]  # masked
    assert line["input"]["tool"]["name"] == "fake"


async def test_inside_a_request_the_line_is_written_once_the_request_is_answered(tmp_path: Path) -> None:
    log = log_in(tmp_path / "d.jsonl", flush_seconds=0)
    with answering():  # as the lean edge serves a request
        log.emit_later(document(), decision(1))
        for _ in range(5):
            await asyncio.sleep(0)  # turns pass: the request is not answered yet
        assert lines(tmp_path / "d.jsonl") == []
    assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d1"]  # as it is
    log.close()


async def test_a_request_slower_than_the_bound_does_not_hold_the_lines(tmp_path: Path) -> None:
    log = log_in(tmp_path / "d.jsonl", flush_seconds=0)
    with answering():  # its tool still runs: the lines of its decision and of those joining it are due
        log.emit_later(document(), decision(1))
        log.emit_later(document(), decision(2))
        await asyncio.sleep(LATER_SECONDS * 4)
        assert [e["decision_id"] for e in lines(tmp_path / "d.jsonl")] == ["d1", "d2"]
    log.close()
