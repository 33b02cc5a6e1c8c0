"""The guard stages with the shipped default policy (embedded engine): detections reach Rego, a policy
that denies on a card number in the arguments denies, and a card number in a result is masked."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.audit.records import decision_record, outcome_record
from server.audit.redaction import Redactor
from server.errors import Denied
from server.guardrails.detectors import Detector
from server.guardrails.stage import GuardArgumentsStage, GuardResultStage
from server.policy.bundle import PolicyBundle
from server.policy.embedded import EmbeddedEngine
from server.policy.stage import PolicyStage
from server.registry import ToolOutput
from server.settings import REPO_ROOT
from tests.fakes.backends import allowed, make_call

pytestmark = pytest.mark.anyio

CARD = "4111 1111 1111 1111"
DETECTOR = Detector()


async def engine_for(policies: Path) -> EmbeddedEngine:
    return EmbeddedEngine(PolicyBundle.from_directory(policies))


@pytest.fixture
async def default_engine() -> AsyncIterator[EmbeddedEngine]:
    engine = await engine_for(REPO_ROOT / "policies")
    yield engine
    await engine.close()


@pytest.fixture
async def card_denying_engine(tmp_path: Path) -> AsyncIterator[EmbeddedEngine]:
    shutil.copytree(REPO_ROOT / "policies", tmp_path / "policies")
    data = tmp_path / "policies" / "castellan" / "config" / "data.json"
    data.write_text(
        data.read_text().replace(
            '"admin_groups"', '"guardrails": {"deny_in_arguments": ["card_number"]}, "admin_groups"'
        )
    )
    engine = await engine_for(tmp_path / "policies")
    yield engine
    await engine.close()


async def test_detections_in_arguments_reach_the_policy_input() -> None:
    call = await GuardArgumentsStage(DETECTOR).run(
        make_call(arguments={"q": f"pay with {CARD}", "contact": {"email": "jo@example.org"}})
    )
    kinds = {(d["kind"], d["path"]) for d in call.detections}
    assert kinds == {("card_number", "q"), ("email", "contact.email")}
    assert all(CARD not in str(d) for d in call.detections)  # what and where, never the value


async def test_a_policy_that_denies_card_numbers_in_arguments_denies(card_denying_engine: EmbeddedEngine) -> None:
    call = await GuardArgumentsStage(DETECTOR).run(make_call(arguments={"q": f"card {CARD}"}))
    with pytest.raises(Denied) as refused:
        await PolicyStage(card_denying_engine).run(call)
    assert refused.value.reasons == ("argument q holds a card_number (card.visa)",)
    clean = await GuardArgumentsStage(DETECTOR).run(make_call(arguments={"q": "no card here"}))
    assert (await PolicyStage(card_denying_engine).run(clean)).allowed


async def test_a_card_hidden_by_full_width_digits_and_zero_width_spaces_is_still_found(
    card_denying_engine: EmbeddedEngine,
) -> None:
    disguised = "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in CARD).replace(" ", "\u200b")
    call = await GuardArgumentsStage(DETECTOR).run(make_call(arguments={"q": disguised}))
    with pytest.raises(Denied):
        await PolicyStage(card_denying_engine).run(call)


async def test_the_default_policy_flags_personal_data_in_arguments(default_engine: EmbeddedEngine) -> None:
    call = await GuardArgumentsStage(DETECTOR).run(make_call(arguments={"q": "mail jo@example.org"}))
    decided = await PolicyStage(default_engine).run(call)
    assert decided.allowed
    assert decision_record(decided)["flags"] == ["personal_data:email"]


async def test_the_default_policy_masks_a_card_number_in_a_result(default_engine: EmbeddedEngine) -> None:
    output = ToolOutput(text=f"customer jo@example.org paid with {CARD}")
    call = allowed(make_call(), output=output)
    guarded = await GuardResultStage(DETECTOR, default_engine).run(call)
    assert guarded.output is not None
    assert guarded.output.text == "customer jo@example.org paid with [REDACTED:card_number]"
    record = outcome_record(guarded, 0.0, Redactor())
    assert CARD not in str(record)
    assert record["guard"]["obligations"]["redact_detections"] == ["card_number"]
    assert set(record["flags"]) == {"personal_data:card_number", "personal_data:email"}


async def test_structured_results_are_masked_in_the_structure_and_its_text(default_engine: EmbeddedEngine) -> None:
    import json

    rows = {"rows": [{"name": "Jo", "card": CARD}, {"name": "Al", "card": "5555 5555 5555 4444"}]}
    output = ToolOutput(text=json.dumps(rows), structured=rows)
    guarded = await GuardResultStage(DETECTOR, default_engine).run(allowed(make_call(), output=output))
    assert guarded.output is not None
    assert guarded.output.structured is not None
    assert [r["card"] for r in guarded.output.structured["rows"]] == ["[REDACTED:card_number]"] * 2
    assert json.loads(guarded.output.text) == guarded.output.structured
    detections = guarded.result_detections
    assert {(d["path"], d["type"], d["count"]) for d in detections} == {
        ("structured.rows[*].name", "person_name.field", 2),  # found by the member's name
        ("structured.rows[*].card", "card.visa", 1),
        ("structured.rows[*].card", "card.mastercard", 1),
    }


async def test_a_result_without_detections_is_not_decided_again(default_engine: EmbeddedEngine) -> None:
    call = allowed(make_call(), output=ToolOutput(text="nothing personal"))
    guarded = await GuardResultStage(DETECTOR, default_engine).run(call)
    assert guarded.result_decision is None
    assert guarded.output == call.output


async def test_a_secret_in_a_result_is_masked_by_the_audit_redactors_rules(default_engine: EmbeddedEngine) -> None:
    output = ToolOutput(text="key AKIAIOSFODNN7EXAMPLE for the bucket")
    guarded = await GuardResultStage(DETECTOR, default_engine).run(allowed(make_call(), output=output))
    assert guarded.output is not None
    assert guarded.output.text == "key [REDACTED:secret] for the bucket"


async def test_a_policy_that_refuses_a_result_withholds_it(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "policies", tmp_path / "policies")
    (tmp_path / "policies" / "castellan" / "results.rego").write_text(
        "package castellan.gateway\n\nimport rego.v1\n\n"
        'deny contains "no IBANs in results" if {\n\tinput.action == "result"\n'
        '\tsome d in input.detections\n\td.kind == "iban"\n}\n'
    )
    engine = await engine_for(tmp_path / "policies")
    try:
        output = ToolOutput(text="pay to DE89 3704 0044 0532 0130 00")
        with pytest.raises(Denied) as refused:
            await GuardResultStage(DETECTOR, engine).run(allowed(make_call(), output=output))
        assert refused.value.reasons == ("no IBANs in results",)
    finally:
        await engine.close()


async def test_the_decision_record_keeps_what_replay_needs() -> None:
    call = await GuardArgumentsStage(DETECTOR).run(make_call(arguments={"q": "mail jo@example.org"}))
    record = decision_record(allowed(call))
    recorded = record["decision_input"]
    assert "arguments" not in recorded
    assert "normalized" not in recorded
    assert recorded["detections"][0]["kind"] == "email"
    assert recorded["tool"]["name"] == "fake"
