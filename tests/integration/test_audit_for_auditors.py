"""An auditor's view of a running gateway: search and show (CLI and HTTP), and verify that notices tampering."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server.testing import GatewayProcess, run_gateway
from tests.integration.conftest import raw_call

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def audit_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "audit", *args],
        env=gw.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_auditors_search_show_and_verify(tmp_path: Path) -> None:
    with run_gateway(tmp_path / "gw", {"CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0"}) as gw:
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
