"""The reference agent against a real gateway: answers with the SQL tool (audited under its identity),
stops cleanly on loop and budget denials, and its evaluation passes on the golden set and fails when
policy denies a tool the golden set expects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent_client.agent import Agent
from agent_client.gateway import connect
from agent_client.models import ScriptedModel
from server.settings import REPO_ROOT
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
REVENUE = {
    "steps": [
        {
            "tool": "sql.query",
            "arguments": {
                "query": "SELECT region, SUM(amount) AS revenue FROM main.sales.orders "
                "GROUP BY region ORDER BY revenue DESC LIMIT 1"
            },
        }
    ],
    "answer": "The region with the highest revenue is {result[rows][0][0]}.",
}


def agent_cli(gw: GatewayProcess, token: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CASTELLAN_AGENT_GATEWAY_URL": gw.mcp_url,
        "CASTELLAN_AGENT_TOKEN": token,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "agent_client", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=cwd,
    )


async def test_the_agent_answers_with_the_sql_tool_and_the_call_is_audited_under_its_identity(
    tmp_path: Path, gateway: GatewayProcess
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(REVENUE))
    token = gateway.token("revenue-agent", ["analysts"])
    done = agent_cli(gateway, token, "ask", "Which region had the highest revenue?", "--script", str(plan))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "→ sql.query" in done.stdout
    assert "[allowed," in done.stdout
    assert "answer: The region with the highest revenue is APAC." in done.stdout

    found = run_cli(gateway, "audit", "search", "--agent", "revenue-agent", "--format", "jsonl")
    (record,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert record["tool"] == "sql.query"
    assert record["decision"] == "allow"
    assert record["traceparent"].startswith(f"00-{record['run_id']}-")  # the agent's run id is its trace id


async def test_the_agent_stops_cleanly_on_loop_and_budget_denials(tmp_path: Path) -> None:
    env = {
        "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "2",
        "CASTELLAN_METERING__AGENTS": json.dumps({"thrifty": {"tokens_per_day": 40, "max_run_calls": 0}}),
        "CASTELLAN_METERING__RESERVE_OUTPUT_TOKENS": "10",
    }
    echo_plan = ScriptedModel(
        {"steps": [{"tool": "echo", "arguments": {"text": f"step {i}"}} for i in range(6)], "answer": "done"}
    )
    with run_gateway(tmp_path / "gw", env) as gw:
        async with connect(gw.mcp_url, gw.token("looper", ["analysts"])) as session:
            result = await Agent(session, echo_plan, max_steps=10).run("echo six times")
        assert result.stop_reason == "loop"
        assert [s.decision for s in result.steps] == ["allow", "allow", "deny"]
        assert "loop depth" in (result.answer or "")

        async with connect(gw.mcp_url, gw.token("thrifty", ["analysts"])) as session:
            result = await Agent(session, echo_plan, max_steps=10).run("echo six times")
        assert result.stop_reason == "budget"
        assert result.steps[-1].stage == "admit"
        assert "token budget" in (result.answer or "")
        assert 1 <= len(result.steps) < 6


async def test_eval_passes_on_the_golden_set_and_fails_when_policy_denies_an_expected_tool(tmp_path: Path) -> None:
    with run_gateway(tmp_path / "gw") as gw:
        token = gw.token("eval-agent", ["analysts"])
        done = agent_cli(gw, token, "eval", "--json", str(tmp_path / "results.json"), cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "passed" in done.stdout
        assert "logged to MLflow" in done.stdout
        rows = json.loads((tmp_path / "results.json").read_text())
        assert {r["id"] for r in rows} >= {"revenue-by-region", "customer-emails", "refund-policy"}
        assert all(r["scores"]["policy_compliance"] == 1.0 for r in rows)

    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    (policies / "castellan" / "sql_off.rego").write_text(
        "package castellan.gateway\n\nimport rego.v1\n\n"
        'deny contains "sql.query is switched off" if input.tool.name == "sql.query"\n'
    )
    with run_gateway(tmp_path / "gw2", {"CASTELLAN_POLICY__PATH": str(policies)}) as gw:
        token = gw.token("eval-agent", ["analysts"])
        done = agent_cli(gw, token, "eval", "--no-mlflow", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stderr
    assert "answer_facts" in done.stderr


async def test_eval_catches_each_deliberate_mistake_and_says_a_scripted_run_checks_only_the_harness(
    tmp_path: Path, gateway: GatewayProcess
) -> None:
    mistakes = REPO_ROOT / "agent_client" / "golden" / "mistakes.jsonl"
    token = gateway.token("eval-agent", ["analysts"])
    out = tmp_path / "mistakes.json"
    done = agent_cli(gateway, token, "eval", str(mistakes), "--no-mlflow", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checks the harness" in done.stdout
    assert "every deliberate mistake lowered the metrics it should" in done.stdout
    rows = {r["id"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"wrong-trajectory", "wrong-argument", "policy-violation"}
    assert rows["wrong-trajectory"]["scores"]["tool_selection"] < 1.0
    assert rows["wrong-argument"]["scores"]["argument_correctness"] < 1.0
    assert rows["policy-violation"]["scores"]["decision_accuracy"] < 1.0
    assert rows["policy-violation"]["calls"][0]["decision"] == "deny"


async def test_ask_without_a_model_or_without_a_gateway_says_what_to_do_in_one_line(gateway: GatewayProcess) -> None:
    token = gateway.token("lost-agent", ["analysts"])
    done = agent_cli(gateway, token, "ask", "Which region had the highest revenue?")
    assert done.returncode == 1
    assert "CASTELLAN_AGENT_LLM_BASE_URL" in done.stderr
    assert "--script" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    env_gateway = GatewayProcess(gateway.data_dir, 9, gateway.process, gateway.log_path)  # nothing listens on :9
    done = agent_cli(
        env_gateway, token, "ask", "hi", "--script", str(REPO_ROOT / "agent_client/golden/revenue.plan.json")
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
