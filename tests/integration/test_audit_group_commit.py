"""A real gateway SIGKILLed inside the outcome group-commit interval: no decision is lost, every call
the agent was served is accounted for (its own outcome, or `interrupted` after the restart), the
chain verifies and the meter holds nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.gateway_process import run_gateway
from tests.integration.conftest import raw_call
from tests.integration.test_audit_integrity import cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

# A long interval, so the kill lands inside it whatever the machine's load.
ENV = {"CASTELLAN_AUDIT__OUTCOME_COMMIT_SECONDS": "5", "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0"}


def records(data: Path) -> dict[str, dict[str, dict[str, object]]]:
    """Each call's records by kind, keyed by the echo text it carried."""
    with contextlib.closing(sqlite3.connect(f"file:{data / 'audit.db'}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT call_id, kind, record FROM outbox ORDER BY seq").fetchall()
    texts: dict[str, str] = {}
    by_call: dict[str, dict[str, dict[str, object]]] = {}
    for call_id, kind, record in rows:
        body = json.loads(record)
        by_call.setdefault(call_id, {})[kind] = body
        if kind == "decision" and isinstance(body.get("arguments"), dict):
            texts[call_id] = str(body["arguments"].get("text"))
    return {texts[c]: r for c, r in by_call.items() if c in texts}


@pytest.mark.timeout(600)
async def test_a_kill_inside_the_group_commit_interval_loses_no_decision_and_reports_interrupted_calls(
    tmp_path: Path,
) -> None:
    data = tmp_path / "gw"
    texts = [f"group commit {i}" for i in range(24)]
    with run_gateway(data, ENV, timeout=120) as gw:
        token = gw.token("crash-bot", ["analysts"])
        results = []
        for start in range(0, len(texts), 4):  # four at a time: decisions group-commit together
            batch = [raw_call(gw, token, "echo", {"text": t}) for t in texts[start : start + 4]]
            results += await asyncio.gather(*batch)
        gw.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gw.process.wait)
    assert all(r["isError"] is False for r in results)  # every call was served
    before = records(data)
    assert set(before) == set(texts)  # every decision was durable before its tool ran
    assert all(r["decision"]["decision"] == "allow" for r in before.values())
    open_calls = {t for t, r in before.items() if "outcome" not in r}
    assert open_calls  # the last outcomes were still waiting for their group commit

    with run_gateway(data, ENV, timeout=120):
        after = records(data)
        verified = await asyncio.to_thread(cli, data, ENV, "audit", "verify")
        usage = await asyncio.to_thread(cli, data, ENV, "usage", "--agent", "crash-bot", "--json")
    assert set(after) == set(texts)
    for text, r in after.items():
        outcome = r["outcome"]
        assert bool(outcome.get("interrupted")) is (text in open_calls), (text, outcome)
        if text not in open_calls:
            assert outcome["is_error"] is False
    assert verified.returncode == 0, verified.stderr
    assert f"{len(open_calls)} call(s) interrupted by a crash" in verified.stderr
    assert usage.returncode == 0, usage.stderr
    assert json.loads(usage.stdout)["in_flight"] == 0
