"""What an auditor needs in each record: who acted for whom, from which client, what was held and lacked."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.gateway_process import GatewayProcess
from tests.integration.conftest import deny_body, raw_call, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_a_grants_denial_records_what_the_caller_held_and_lacked(gateway: GatewayProcess) -> None:
    token = gateway.token("auditee", ["analysts"], subject="alice@example.com")
    denied = deny_body(await raw_call(gateway, token, "demo.reset", {}))
    assert denied["stage"] == "grants"
    found = run_cli(gateway, "audit", "search", "--agent", "auditee", "--tool", "demo.reset", "--format", "jsonl")
    (record,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert record["grants_missing"], record
    assert any("missing privilege " + m in record["reasons"] for m in record["grants_missing"])
    assert "USE CATALOG on main" in " ".join(record["grants"]), record  # analysts may use the catalog


async def test_the_record_and_the_csv_export_name_subject_groups_arguments_and_the_client(
    gateway: GatewayProcess,
) -> None:
    token = gateway.token("csv-agent", ["analysts", "auditors"], subject="bob@example.com")
    await raw_call(gateway, token, "echo", {"text": "for the record", "token": "s3cr3t-value-1234"})
    found = run_cli(gateway, "audit", "search", "--agent", "csv-agent", "--format", "jsonl")
    (record,) = [json.loads(line) for line in found.stdout.splitlines()]
    client = record["client"]
    assert client["name"] == "castellan-bench"  # the clientInfo the 2026-07-28 envelope carried
    assert "aiohttp" in client["user_agent"]
    assert client["address"].startswith("127.0.0.1:")

    exported = run_cli(gateway, "audit", "search", "--agent", "csv-agent", "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert row["subject"] == "bob@example.com"
    assert row["groups"] == "analysts; auditors"
    arguments = json.loads(row["arguments"])
    assert arguments["text"] == "for the record"
    assert arguments["token"] == "[REDACTED]"
    assert "s3cr3t-value-1234" not in exported.stdout
    assert json.loads(row["client"])["name"] == "castellan-bench"
