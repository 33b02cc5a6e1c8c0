"""Shadow policy and replay, hermetic: a shadow is never enforced and never fails a call; replay
compares recorded verdicts with a candidate's and skips what policy did not decide."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from server.audit.records import decision_record, outcome_record
from server.errors import Denied
from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog
from server.policy.engine import Decision
from server.policy.replay import replay, since_time
from server.policy.shadow import ShadowPolicy, ShadowStage, change
from server.policy.stage import PolicyStage
from tests.fakes.backends import StaticPolicy, make_call

pytestmark = pytest.mark.anyio

ALLOW = Decision(allow=True, policy_version="live")
DENY = Decision(allow=False, reasons=("no",), policy_version="candidate")


class SlowPolicy(StaticPolicy):
    async def decide(self, document: Mapping[str, Any]) -> Decision:
        import asyncio

        await asyncio.sleep(5)
        return self.decision


def test_change_names_the_direction_and_ignores_reworded_reasons() -> None:
    assert change(ALLOW, DENY) == "allow_to_deny"
    assert change(DENY, ALLOW) == "deny_to_allow"
    assert change(DENY, Decision(allow=False, reasons=("said otherwise",))) is None
    assert change(ALLOW, Decision(allow=True, obligations={"max_result_chars": 10})) == "obligations"
    assert (
        change(
            Decision(allow=True, obligations={"flags": ["a", "b"]}),
            Decision(allow=True, obligations={"flags": ["b", "a"]}),
        )
        is None
    )


async def test_a_shadow_that_denies_is_not_enforced_and_is_recorded_with_the_outcome() -> None:
    shadow = ShadowPolicy(StaticPolicy(DENY), 1.0, CollectorRegistry())
    call = await PolicyStage(StaticPolicy(ALLOW), shadow=shadow).run(make_call())
    assert call.allowed
    call = await ShadowStage(1.0).run(call)
    assert call.shadow is not None
    assert (call.shadow["differs"], call.shadow["change"], call.shadow["reasons"]) == (True, "allow_to_deny", ["no"])
    assert outcome_record(call, 0.0)["shadow"]["change"] == "allow_to_deny"


async def test_a_refused_call_records_the_shadow_in_its_decision_record() -> None:
    shadow = ShadowPolicy(StaticPolicy(ALLOW), 1.0, CollectorRegistry())
    call = make_call()
    with pytest.raises(Denied) as refused:
        await PolicyStage(StaticPolicy(DENY), shadow=shadow).run(call)
    assert refused.value.decision is not None
    stopped = replace(call, error=refused.value, decision=refused.value.decision)
    assert decision_record(stopped)["shadow"]["change"] == "deny_to_allow"


@pytest.mark.parametrize("live", [ALLOW, DENY])
async def test_the_shadow_decides_the_input_as_built_not_as_the_decision_log_masked_it(
    tmp_path: Path, live: Decision
) -> None:
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / "log.rego").write_text(
        'package system.log\n\nimport rego.v1\n\nmask contains "/input/arguments/q"\n'
    )
    log = DecisionLog(tmp_path / "decisions.jsonl", PolicyBundle.from_directory(tmp_path), "castellan/gateway/decision")
    candidate = StaticPolicy(ALLOW)
    stage = PolicyStage(StaticPolicy(live), decision_log=log, shadow=ShadowPolicy(candidate, 1.0, CollectorRegistry()))
    if live.allow:
        await ShadowStage(1.0).run(await stage.run(make_call()))
    else:
        with pytest.raises(Denied):
            await stage.run(make_call())
    log.flush()
    logged = json.loads((tmp_path / "decisions.jsonl").read_text())
    assert "q" not in logged["input"]["arguments"]  # the log masked its copy
    assert candidate.inputs[0]["arguments"] == {"q": "hello"}  # the shadow decided the call's own input


async def test_a_shadow_that_is_down_or_slow_changes_nothing_but_its_record() -> None:
    down = ShadowPolicy(StaticPolicy(down=True), 1.0, CollectorRegistry())
    call = await ShadowStage(1.0).run(await PolicyStage(StaticPolicy(ALLOW), shadow=down).run(make_call()))
    assert call.allowed
    assert call.shadow is not None
    assert "error" in call.shadow
    assert call.shadow["differs"] is False
    slow = ShadowPolicy(SlowPolicy(DENY), 0.05, CollectorRegistry())
    call = await ShadowStage(1.0).run(await PolicyStage(StaticPolicy(ALLOW), shadow=slow).run(make_call()))
    assert call.allowed
    assert call.shadow == {"error": "timed out", "differs": False, "policy_version": "candidate"}


def test_since_takes_durations_and_times() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert since_time("24h", now) == "2026-11-30T12:00:00+00:00"
    assert since_time("30m", now) == "2026-12-01T11:30:00+00:00"
    assert since_time("2026-11-30T00:00:00Z") == "2026-11-30T00:00:00Z"
    with pytest.raises(ValueError, match="isoformat"):
        since_time("yesterday")


async def records(*items: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


def recorded(call_id: str, decision: str = "allow", stage: str | None = None, **extra: Any) -> dict[str, Any]:
    document = decision_record(make_call(call_id=call_id, decision=ALLOW))["decision_input"]
    code = "denied" if decision == "deny" else None
    return {"call_id": call_id, "tool": "fake", "decision": decision, "stage": stage, "code": code,
            "reasons": ["no"] if decision == "deny" else [], "obligations": {}, "arguments": {"q": "hello"},
            "decision_input": document, **extra}  # fmt: skip


async def test_replay_reports_changes_by_rule_and_tool_and_skips_what_policy_did_not_decide() -> None:
    report = await replay(
        records(
            recorded("a"),
            recorded("b"),
            recorded("c", "deny", "policy"),
            recorded("d", "deny", "grants"),
            recorded("e", "deny", "policy", code="backend_unavailable"),
            {**recorded("f"), "decision_input": None},
        ),
        StaticPolicy(DENY),
    )
    assert (report.examined, report.replayed, report.unchanged) == (6, 3, 1)
    assert report.skipped == {"refused_before_policy": 1, "policy_unavailable": 1, "no_decision_input": 1}
    assert report.groups() == [
        {"change": "allow_to_deny", "tool": "fake", "rule": "no", "count": 2, "calls": ["a", "b"]}
    ]
