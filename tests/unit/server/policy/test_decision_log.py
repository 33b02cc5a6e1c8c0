from __future__ import annotations

import json
from pathlib import Path

from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog, apply_mask
from server.policy.engine import Decision
from server.settings import REPO_ROOT


def log_in(tmp_path: Path) -> DecisionLog:
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    return DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision")


def test_events_follow_opas_format_and_are_masked_by_system_log_mask(tmp_path: Path) -> None:
    log = log_in(tmp_path)
    decision = Decision(allow=False, reasons=("no",), policy_version="v1", engine="opa", decision_id="d1")
    log.emit({"arguments": {"Password": "hunter2", "text": "hi"}}, decision)
    log.close()
    event = json.loads((tmp_path / "decisions.jsonl").read_text())
    assert set(event) >= {"decision_id", "path", "input", "result", "labels", "bundles", "timestamp", "metrics"}
    assert (event["decision_id"], event["path"]) == ("d1", "castellan/gateway/decision")
    assert event["input"] == {"arguments": {"text": "hi"}}
    assert event["erased"] == ["/input/arguments/Password"]
    assert event["result"] == {"allow": False, "reasons": ["no"], "obligations": {}}
    assert event["bundles"] == {"castellan": {"revision": "v1"}}
    assert "hunter2" not in (tmp_path / "decisions.jsonl").read_text()


def test_masking_does_not_depend_on_the_engine(tmp_path: Path) -> None:
    log = log_in(tmp_path)
    events = [
        log.event({"arguments": {"token": "t", "q": 1}}, Decision(allow=True, engine=e)) for e in ("embedded", "opa")
    ]
    assert [e["input"] for e in events] == [{"arguments": {"q": 1}}] * 2
    assert [e["erased"] for e in events] == [["/input/arguments/token"]] * 2


def test_upsert_and_remove_operations() -> None:
    event = {"input": {"a": {"b": 1}, "c": 2}, "result": {}}
    apply_mask(
        event,
        [
            {"op": "upsert", "path": "/input/a/b", "value": "***"},
            {"op": "remove", "path": "/input/c"},
            "/input/missing",
            "/not-input/x",
        ],
    )
    assert event["input"] == {"a": {"b": "***"}}
    assert (event["masked"], event["erased"]) == (["/input/a/b"], ["/input/c"])
