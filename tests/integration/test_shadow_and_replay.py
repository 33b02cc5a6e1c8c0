"""Shadow policy and replay against a real gateway: a candidate policy that denies one tool shows
exactly the affected calls, in shadow mode under live calls (audit search, /metrics) and in a replay
of the audit outbox; and guardrail detections reach the live decision and its record."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from server.settings import REPO_ROOT
from tests.audit_trail import settled_audit
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import raw_call, run_cli

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CANDIDATE_RULE = """package castellan.gateway

import rego.v1

deny contains "echo is retired: use docs.search" if {
	input.tool.name == "echo"
}
"""


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("candidate") / "policies"
    shutil.copytree(REPO_ROOT / "policies", root)
    (root / "castellan" / "retire_echo.rego").write_text(CANDIDATE_RULE)
    return root


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory: pytest.TempPathFactory, candidate: Path) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("shadowed")
    with run_gateway(data_dir, {"CASTELLAN_POLICY__SHADOW_PATH": str(candidate)}, timeout=120) as gateway:
        yield gateway


def search(gateway: GatewayProcess, *args: str) -> list[dict[str, object]]:
    return settled_audit(gateway, "--limit", "1000", *args)  # the outcomes are group-committed after the response


@pytest.fixture(scope="module")
def traffic(shadowed: GatewayProcess) -> dict[str, set[str]]:
    """Live calls of several tools, some allowed, some denied by the live policy; the call ids by kind."""

    async def calls() -> None:
        token = shadowed.token("analyst-bot", ["analysts"])
        for text in ("one", "two", "three"):
            await raw_call(shadowed, token, "echo", {"text": text})
        await raw_call(shadowed, token, "echo", {"text": "x" * 300})  # denied live (too long): no change
        await raw_call(shadowed, token, "clock.now", {})
        await raw_call(shadowed, token, "echo", {"text": "pay with 4111 1111 1111 1111"})
        outsider = shadowed.token("outsider-bot", ["nobody"])
        await raw_call(shadowed, outsider, "clock.now", {})  # denied live (group): the candidate agrees

    asyncio.run(calls())
    records = search(shadowed)
    echo_allowed = {str(r["call_id"]) for r in records if r["tool"] == "echo" and r["decision"] == "allow"}
    assert len(echo_allowed) == 4
    return {"echo_allowed": echo_allowed, "all": {str(r["call_id"]) for r in records}}


async def test_shadow_mode_records_exactly_the_calls_the_candidate_would_deny(
    shadowed: GatewayProcess, traffic: dict[str, set[str]]
) -> None:
    differing = search(shadowed, "--shadow-diff")
    assert {str(r["call_id"]) for r in differing} == traffic["echo_allowed"]
    for record in differing:
        outcome = record["outcome"]
        assert isinstance(outcome, dict)
        shadow = outcome["shadow"]  # decided beside the allowed call: in its outcome record
        assert isinstance(shadow, dict)
        assert shadow["change"] == "allow_to_deny"
        assert shadow["reasons"] == ["echo is retired: use docs.search"]
        assert record["decision"] == "allow"  # never enforced
    decided = [r for r in search(shadowed) if r["stage"] in (None, "policy")]
    refused = [r for r in decided if r["decision"] == "deny"]
    assert [r["shadow"]["differs"] for r in refused] == [False]  # type: ignore[index]  # the 300-character echo
    allowed = [r for r in decided if r["decision"] == "allow" and str(r["call_id"]) not in traffic["echo_allowed"]]
    assert [r["outcome"]["shadow"]["differs"] for r in allowed] == [False]  # type: ignore[index]  # clock.now


async def test_shadow_disagreements_are_counted_in_metrics(
    shadowed: GatewayProcess, traffic: dict[str, set[str]]
) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{shadowed.base_url}/metrics") as resp:
        text = await resp.text()
    assert 'castellan_shadow_disagreements_total{change="allow_to_deny",tool="echo"} 4.0' in text
    assert "castellan_shadow_decisions_total" in text


async def test_replay_shows_exactly_the_affected_past_calls(
    shadowed: GatewayProcess, candidate: Path, traffic: dict[str, set[str]]
) -> None:
    done = run_cli(shadowed, "policy", "replay", "--policy", str(candidate), "--json")
    assert done.returncode == 2, done.stderr  # something would change: a CI gate fails
    report = json.loads(done.stdout)
    assert report["changes"] == {"allow_to_deny": 4, "deny_to_allow": 0, "obligations": 0}
    assert {c["call_id"] for c in report["calls"]} == traffic["echo_allowed"]
    assert [(g["change"], g["tool"], g["rule"], g["count"]) for g in report["groups"]] == [
        ("allow_to_deny", "echo", "echo is retired: use docs.search", 4)
    ]
    text = run_cli(shadowed, "policy", "replay", "--policy", str(candidate), "--since", "1h")
    assert text.returncode == 2
    assert "4 would change (4 allow -> deny, 0 deny -> allow" in text.stdout
    only_new_allows = run_cli(shadowed, "policy", "replay", "--policy", str(candidate), "--fail-on", "deny-to-allow")
    assert only_new_allows.returncode == 0, only_new_allows.stdout


async def test_replaying_the_live_policy_changes_nothing(
    shadowed: GatewayProcess, traffic: dict[str, set[str]]
) -> None:
    """The recorded inputs decide as they did live (the card number in an argument too: detections
    are recorded as found, before redaction)."""
    done = run_cli(shadowed, "policy", "replay", "--policy", str(REPO_ROOT / "policies"), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["changes"] == {"allow_to_deny": 0, "deny_to_allow": 0, "obligations": 0}
    assert report["replayed"] >= 6
    assert report["skipped"].get("refused_before_policy", 0) >= 1  # the outsider's call: refused by grants


async def test_replay_of_one_agent_only_reads_its_calls(
    shadowed: GatewayProcess, candidate: Path, traffic: dict[str, set[str]]
) -> None:
    done = run_cli(shadowed, "policy", "replay", "--policy", str(candidate), "--agent", "outsider-bot", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["examined"] == 1


async def test_a_card_number_in_arguments_is_detected_and_flagged_in_the_record(
    shadowed: GatewayProcess, traffic: dict[str, set[str]]
) -> None:
    [record] = [r for r in search(shadowed, "--tool", "echo") if "personal_data:card_number" in (r.get("flags") or [])]
    assert record["decision"] == "allow"
    detections = record["detections"]
    assert isinstance(detections, list)
    assert [(d["kind"], d["path"]) for d in detections] == [("card_number", "text")]
    assert "4111 1111 1111 1111" not in json.dumps(record["decision_input"])


async def test_the_echoed_card_number_is_masked_in_the_result(shadowed: GatewayProcess) -> None:
    token = shadowed.token("analyst-bot", ["analysts"])
    result = await raw_call(shadowed, token, "echo", {"text": "card 5555 5555 5555 4444 thanks"})
    text = json.dumps(result)
    assert "5555 5555 5555 4444" not in text
    assert "[REDACTED:card_number]" in text
