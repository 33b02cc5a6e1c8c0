"""An auditor's view of a running gateway: search and show (CLI and HTTP), and verify that notices tampering."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import anyio
import pytest

from tests.gateway_process import GatewayProcess, run_cli, run_gateway
from tests.integration.conftest import raw_call
from tests.integration.test_audit_shipping import metric

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def audit_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    # `--source mlflow` imports MLflow and opens its store: ~25 s on a loaded 2-core box
    return run_cli(gw, "audit", *args, timeout=180)


@pytest.mark.timeout(300)  # a gateway and five CLI runs: minutes on a loaded 2-core machine
async def test_auditors_search_show_and_verify(tmp_path: Path) -> None:
    with run_gateway(tmp_path / "gw", {"CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0"}, timeout=90) as gw:
        token = gw.token("audited-agent", ["analysts"])
        for i in range(3):
            await raw_call(gw, token, "echo", {"text": f"hello {i}"})
        await raw_call(gw, token, "demo.reset", {})
        found = await asyncio.to_thread(
            audit_cli, gw, "search", "--agent", "audited-agent", "--decision", "deny", "--format", "jsonl"
        )
        (denial,) = [json.loads(line) for line in found.stdout.splitlines()]
        assert (denial["tool"], denial["stage"]) == ("demo.reset", "grants")
        shown = json.loads((await asyncio.to_thread(audit_cli, gw, "show", denial["call_id"])).stdout)
        assert shown["decision"]["reasons"] == denial["reasons"]
        admin = gw.token("auditor", scopes=["castellan:admin"])
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"{gw.base_url}/admin/audit",
                params={"agent": "audited-agent", "tool": "echo"},
                headers={"authorization": f"Bearer {admin}"},
            ) as resp,
        ):
            results = (await resp.json())["results"]
        assert len(results) == 3
        assert all(r["outcome"]["result_preview"].startswith("hello") for r in results)
        verified = await asyncio.to_thread(audit_cli, gw, "verify")
        assert verified.returncode == 0
        assert "intact" in verified.stdout

    conn = sqlite3.connect(tmp_path / "gw" / "audit.db")
    conn.execute("DROP TRIGGER outbox_no_update")
    conn.execute(
        "UPDATE outbox SET record = replace(record, 'hello 1', 'hello X') WHERE kind = 'decision' "
        "AND record LIKE '%hello 1%'"
    )
    seq = conn.execute("SELECT seq FROM outbox WHERE record LIKE '%hello X%'").fetchone()[0]
    conn.commit()
    tampered = audit_cli(gw, "verify")
    assert tampered.returncode == 1
    assert f"record {seq}: its content does not match its hash (edited)" in tampered.stderr


@pytest.mark.timeout(400)
async def test_the_central_store_is_searched_like_the_outbox_and_secrets_are_never_stored(tmp_path: Path) -> None:
    """Default shipping target (a local MLflow store, no server): search it, export Parquet, and the
    secret an agent passed is redacted in both stores while the agent's own result is untouched by that
    redaction. (The default policy's result guardrail would mask a secret in the result too, for the agent:
    docs/guardrails.md; it is off here so what the audit redaction alone does is what is seen.)"""
    env = {
        "CASTELLAN_AUDIT__SHIP": "true",
        "CASTELLAN_AUDIT__SHIP_INTERVAL_SECONDS": "0.2",
        "CASTELLAN_GUARDRAILS__RESULTS": "false",
    }
    with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
        token = gw.token("shipped-agent", ["analysts"])
        secret = "sk-" + "A1b2C3d4" * 4
        refused = await raw_call(gw, token, "echo", {"text": f"my key is {secret}", "token": "hunter2"})
        assert refused["isError"] is True  # not in echo's schema: refused, and recorded (redacted)
        await raw_call(gw, token, "echo", {"text": f"again {secret}"})
        denied = await raw_call(gw, token, "demo.reset", {})
        assert denied["isError"] is True
        assert secret in json.dumps(await raw_call(gw, token, "echo", {"text": secret}))  # the agent gets its text

        async def mlflow_search(*args: str) -> list[dict[str, object]]:
            done = await asyncio.to_thread(audit_cli, gw, "search", "--source", "mlflow", "--format", "jsonl", *args)
            assert done.returncode == 0, done.stderr
            return [json.loads(line) for line in done.stdout.splitlines()]

        with anyio.fail_after(90):
            while await metric(gw, "castellan_audit_shipped_calls") < 4:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.3)
            while len(await mlflow_search("--agent", "shipped-agent")) < 4:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.5)
        assert len(await mlflow_search("--agent", "shipped-agent", "--decision", "deny")) == 2
        (deny,) = await mlflow_search("--agent", "shipped-agent", "--decision", "deny", "--tool", "demo.reset")
        assert deny["tool"] == "demo.reset"
        assert any("EXECUTE" in r for r in deny["reasons"])
        assert len(await mlflow_search("--reason", "EXECUTE")) == 1
        assert await mlflow_search("--agent", "nobody") == []

        parquet = tmp_path / "calls.parquet"
        done = await asyncio.to_thread(audit_cli, gw, "search", "--format", "parquet", "--output", str(parquet))
        assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(parquet).to_pylist()
    assert len(table) == 4
    assert sorted(r["decision"] for r in table) == ["allow", "allow", "deny", "deny"]
    (refused_row,) = [r for r in table if r["tool"] == "echo" and r["decision"] == "deny"]
    assert json.loads(refused_row["arguments"]) == {"text": "my key is [REDACTED]", "token": "[REDACTED]"}
    stored = (tmp_path / "gw" / "audit.db").read_bytes() + (tmp_path / "gw" / "mlflow.db").read_bytes()
    assert secret.encode() not in stored
    assert b"hunter2" not in stored
    assert b"[REDACTED]" in stored
