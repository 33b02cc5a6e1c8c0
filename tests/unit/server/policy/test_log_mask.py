"""The embedded engine (OPA library) evaluates the decision log's mask with the decision, in one
library call; the decision log uses it only for the very document and result it was given, and masks
exactly as it would on its own."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from server.policy import decision_log as decision_log_module
from server.policy import inprocess_opa
from server.policy._input import build_input
from server.policy.bundle import PolicyBundle, log_mask_bundle
from server.policy.decision_log import DecisionLog
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import Decision
from server.settings import REPO_ROOT
from tests.fakes.backends import make_call
from tools.echo import EchoTool

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not inprocess_opa.available(), reason="the OPA library is not built (needs Go)"),
]

# A mask that reads the result as well as the input, as OPA's decision logger gives it both.
RESULT_MASK = """package system.log

import rego.v1

mask contains "/input/arguments/text" if input.result.allow == false

mask contains concat("", ["/input/arguments/", name]) if {
	some name, _ in input.input.arguments
	name == "password"
}

mask contains {"op": "upsert", "path": "/result/reasons", "value": ["(masked)"]} if count(input.result.reasons) > 0
"""

GATEWAY = """package castellan.gateway

import rego.v1

decision := {"allow": count(deny) == 0, "reasons": deny, "obligations": {}}

deny contains "no shouting" if input.arguments.text == "HI"
"""


def bundle_in(tmp_path: Path, gateway: str = GATEWAY, mask: str = RESULT_MASK) -> PolicyBundle:
    (tmp_path / "castellan").mkdir(exist_ok=True)
    (tmp_path / "system").mkdir(exist_ok=True)
    (tmp_path / "castellan" / "gateway.rego").write_text(gateway)
    (tmp_path / "system" / "log.rego").write_text(mask)
    return PolicyBundle.from_directory(tmp_path)


def document(**arguments: Any) -> dict[str, Any]:
    return build_input(make_call(tool=EchoTool(), tool_name="echo", arguments=arguments))


def without_mask(decision: Decision) -> Decision:
    return Decision(
        allow=decision.allow,
        reasons=decision.reasons,
        obligations=decision.obligations,
        policy_version=decision.policy_version,
        engine=decision.engine,
        decision_id=decision.decision_id,
        eval_ms=decision.eval_ms,
    )


def comparable(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("timestamp", "labels")}


@pytest.mark.parametrize("inline_max_us", [1e9, 0.0])  # inline on the loop, and on a worker thread
@pytest.mark.parametrize("arguments", [{"text": "hi", "password": "x"}, {"text": "HI", "password": "x"}, {"text": "a"}])
async def test_the_engines_mask_masks_exactly_as_the_logs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max_us: float, arguments: dict[str, Any]
) -> None:
    bundle = bundle_in(tmp_path)
    engine = EmbeddedEngine(bundle, evaluator="opa-library", inline_max_us=inline_max_us, log_masks=True)
    log = DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision")
    doc = document(**arguments)
    decision = await engine.decide(doc)
    assert decision.log_mask is not None
    own = log.event(copy.deepcopy(doc), without_mask(decision))  # the log evaluates the mask itself
    evaluated: list[str] = []
    monkeypatch.setattr(decision_log_module, "compile_bundle", lambda b: evaluated.append(b.version))
    given = log.event(doc, decision)  # the engine's mask stands in: nothing is evaluated again
    assert evaluated == []
    assert comparable(given) == comparable(own)
    assert "x" not in str(given["input"]["arguments"].get("password", ""))
    log.close()
    await engine.close()


async def test_a_mask_for_another_document_or_result_is_not_used(tmp_path: Path) -> None:
    bundle = bundle_in(tmp_path)
    engine = EmbeddedEngine(bundle, evaluator="opa-library", log_masks=True)
    log = DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision")
    decided = document(text="HI")  # denied: the engine's mask erases the text
    decision = await engine.decide(decided)
    other = document(text="HI", password="x")  # an equal-looking but other document: evaluated afresh
    event = log.event(other, decision)
    assert "password" not in event["input"]["arguments"]
    allowed = Decision(allow=True, policy_version=decision.policy_version, log_mask=decision.log_mask)
    event = log.event(copy.deepcopy(decided), allowed)  # another result: the text stays
    assert event["input"]["arguments"]["text"] == "HI"
    log.close()
    await engine.close()


async def test_a_malformed_decision_is_masked_by_the_log_on_what_it_records(tmp_path: Path) -> None:
    malformed = 'package castellan.gateway\n\ndecision := {"allow": "yes"}\n'
    bundle = bundle_in(tmp_path, gateway=malformed)
    engine = EmbeddedEngine(bundle, evaluator="opa-library", log_masks=True)
    log = DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision")
    doc = document(text="hi")
    decision = await engine.decide(doc)
    assert not decision.allow
    event = log.event(doc, decision)  # the log records a deny, so its mask sees a deny: text erased
    assert event["result"]["allow"] is False
    assert "text" not in event["input"]["arguments"]
    log.close()
    await engine.close()


async def test_a_failing_mask_leaves_the_decision_and_the_log_counts_it(tmp_path: Path) -> None:
    failing = "package system.log\n\nimport rego.v1\n\nmask contains x if x := 1 / 0\n"
    bundle = bundle_in(tmp_path, mask=failing)
    engine = EmbeddedEngine(bundle, evaluator="opa-library", log_masks=True)
    log = DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision")
    doc = document(text="hi")
    decision = await engine.decide(doc)
    assert decision.allow
    assert decision.log_mask is None
    log.emit(doc, decision)
    assert log.failures == 1  # as before: a mask that fails loses the line, never the decision
    log.close()
    await engine.close()


async def test_the_mask_is_evaluated_only_when_asked_and_only_with_mask_rules(tmp_path: Path) -> None:
    plain = EmbeddedEngine(PolicyBundle.from_directory(REPO_ROOT / "policies"), evaluator="opa-library")
    assert (await plain.decide(document(text="hi"))).log_mask is None
    (tmp_path / "p.rego").write_text(GATEWAY)
    no_mask_rules = PolicyBundle.from_directory(tmp_path)
    assert log_mask_bundle(no_mask_rules) is None
    asked = EmbeddedEngine(no_mask_rules, evaluator="opa-library", log_masks=True)
    assert (await asked.decide(document(text="hi"))).log_mask is None
    await plain.close()
    await asked.close()


async def test_an_inline_evaluation_past_its_deadline_is_denied(tmp_path: Path) -> None:
    slow = "count([x | some x in numbers.range(1, 99999); some y in numbers.range(1, 99999); x == y])"
    gateway = f'package castellan.gateway\n\nimport rego.v1\n\ndecision := {{"allow": {slow} > 0}}\n'
    bundle = bundle_in(tmp_path, gateway=gateway)
    engine = EmbeddedEngine(bundle, evaluator="opa-library", inline_max_us=1e9, timeout_seconds=0.05, log_masks=True)
    decision = await engine.decide(document(text="hi"))
    assert not decision.allow
    assert decision.reasons == ("policy evaluation failed",)
    assert decision.log_mask is None
    await engine.close()
