"""The audit trail after real faults: a SIGKILLed gateway (calls cut off mid-flight, then the tail of
its outbox edited), a second shipper, and a full disk. Real gateway processes, a real `mlflow server`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.audit.search import AuditQuery
from tests.gateway_process import GatewayProcess, castellan, cli_env, run_gateway
from tests.integration.conftest import raw_call, run_cli
from tests.integration.test_audit_shipping import metric, shipping_env, until
from tests.mlflow_server import run_mlflow

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SLOW_TOOLS = {
    "CASTELLAN_TOOLS__FUNCTION_MODULES": json.dumps(["tests.fixtures.functions"]),
    "CASTELLAN_TOOLS__FUNCTION_TIMEOUT_SECONDS": "120",
    "CASTELLAN_AUDIT__CHECKPOINT_INTERVAL_SECONDS": "0.5",
    "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
}


def audit_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(gw, "audit", *args, timeout=180)


def outbox_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'audit.db'}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def tamper(data_dir: Path, *sql: str) -> None:
    conn = sqlite3.connect(data_dir / "audit.db", isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS outbox_no_update")
    conn.execute("DROP TRIGGER IF EXISTS outbox_no_delete")
    for statement in sql:
        conn.execute(statement)
    conn.close()


def traces_by_call(tracking_uri: str) -> dict[str, Any]:
    from mlflow.tracing.client import TracingClient
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment_by_name("castellan-audit")
    found: dict[str, Any] = {}
    if experiment is None:  # the shipper has not reached MLflow yet
        return found
    token = None
    while True:
        page = TracingClient(tracking_uri).search_traces(
            locations=[experiment.experiment_id], max_results=500, page_token=token, include_spans=False
        )
        found.update({t.info.tags["castellan.call_id"]: t.info for t in page})
        token = page.token
        if not token:
            return found


async def start_and_kill(tmp_path: Path, env: dict[str, str]) -> tuple[Path, list[str]]:
    data = tmp_path / "gw"
    with run_gateway(data, {**SLOW_TOOLS, **env}, timeout=90) as gw:
        granted = await asyncio.to_thread(
            run_cli, gw, "grants", "grant", "USE", "SCHEMA,", "EXECUTE", "ON", "SCHEMA", "main.tests", "TO", "analysts"
        )
        assert granted.returncode == 0, granted.stderr
        token = gw.token("cut-off-agent", ["analysts"])
        for i in range(4):
            assert (await raw_call(gw, token, "echo", {"text": f"before {i}"}))["isError"] is False
        slow = [asyncio.ensure_future(raw_call(gw, token, "main.tests.sleep", {"seconds": 60})) for _ in range(3)]

        async def all_decided() -> bool:
            rows = outbox_rows(data, "SELECT COUNT(*) FROM outbox WHERE record LIKE '%main.tests.sleep%'")
            return bool(rows[0][0] == 3)

        await until(all_decided, 60)
        assert await all_decided(), gw.log()[-3000:]
        await asyncio.sleep(1.5)  # past the checkpoint interval: the head is signed, outside the database
        gw.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gw.process.wait)
        for call in slow:
            with contextlib.suppress(Exception):
                await call
    cut = [
        row[0]
        for row in outbox_rows(
            data,
            "SELECT d.call_id FROM outbox d WHERE d.kind = 'decision' AND d.record LIKE '%main.tests.sleep%' AND NOT "
            "EXISTS (SELECT 1 FROM outbox o WHERE o.call_id = d.call_id AND o.kind = 'outcome')",
        )
    ]
    assert len(cut) == 3
    return data, cut


def cli(data: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`castellan ARGS` beside a gateway's data directory (the gateway itself may be gone)."""
    return castellan(*args, env=cli_env(data, {**SLOW_TOOLS, **env}), timeout=180)


@pytest.mark.timeout(600)
async def test_calls_cut_off_by_a_kill_are_closed_as_interrupted_and_reach_mlflow_as_errors(tmp_path: Path) -> None:
    with run_mlflow(tmp_path / "mlflow") as mlflow:
        env = shipping_env(mlflow.url)
        data, cut = await start_and_kill(tmp_path, env)

        after_kill = await asyncio.to_thread(cli, data, env, "audit", "verify")
        assert after_kill.returncode == 0, after_kill.stderr
        assert "intact" in after_kill.stdout
        assert "3 allowed call(s) without an outcome yet" in after_kill.stderr

        with run_gateway(data, {**SLOW_TOOLS, **env}, timeout=90) as gw:
            assert await metric(gw, "castellan_audit_interrupted_calls") == 3

            async def shipped_as_errors() -> bool:
                traces = await asyncio.to_thread(traces_by_call, mlflow.url)
                return all(
                    c in traces
                    and str(traces[c].state) == "ERROR"
                    and traces[c].tags.get("castellan.outcome") == "interrupted"
                    for c in cut
                )

            await until(shipped_as_errors, 120)
            assert await shipped_as_errors(), gw.log()[-3000:]
            traces = await asyncio.to_thread(traces_by_call, mlflow.url)
            assert len(traces) == 7  # 4 finished calls and the 3 cut off, each once
            assert all(str(t.state) == "OK" for c, t in traces.items() if c not in cut)

            found = await asyncio.to_thread(audit_cli, gw, "search", "--outcome", "interrupted", "--format", "jsonl")
            assert sorted(json.loads(line)["call_id"] for line in found.stdout.splitlines()) == sorted(cut)
            verified = await asyncio.to_thread(audit_cli, gw, "verify")
            assert verified.returncode == 0, verified.stderr
            assert "3 call(s) interrupted by a crash" in verified.stderr

            async def checkpoints_shipped() -> bool:
                return await metric(gw, "castellan_audit_unshipped_records") == 0

            await until(checkpoints_shipped, 60)
            against_mlflow = await asyncio.to_thread(audit_cli, gw, "verify", "--mlflow")
            assert against_mlflow.returncode == 0, against_mlflow.stderr
            assert " from MLflow" in against_mlflow.stdout
            assert " 0 from MLflow" not in against_mlflow.stdout


@pytest.mark.timeout(300)
async def test_edits_to_the_tail_after_a_kill_are_reported_at_their_position(tmp_path: Path) -> None:
    data, _ = await start_and_kill(tmp_path, {})
    (last,) = outbox_rows(data, "SELECT MAX(seq) FROM outbox")[0]

    def attacked(name: str, *sql: str) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / name
        shutil.copytree(data, copy, ignore=shutil.ignore_patterns("*.lock"))
        tamper(copy, *sql)
        return cli(copy, {}, "audit", "verify")

    cut = await asyncio.to_thread(attacked, "cut", f"DELETE FROM outbox WHERE seq >= {last - 1}")
    assert cut.returncode == 1
    assert (
        f"record {last - 1}: records {last - 1}..{last} are missing: the chain ends before the head checkpoint"
        in cut.stderr
    )

    edited = await asyncio.to_thread(
        attacked, "edited", f"UPDATE outbox SET record = replace(record, '60', '6') WHERE seq = {last}"
    )
    assert edited.returncode == 1
    assert f"record {last}: its content does not match its hash (edited)" in edited.stderr

    head = cli(data, {}, "audit", "verify").stdout.split("chain head ")[1].split(" ")[0]
    assert head.startswith(f"{last}:")
    shutil.copytree(data, tmp_path / "cut-both", ignore=shutil.ignore_patterns("*.lock"))
    (tmp_path / "cut-both" / "audit-checkpoints.jsonl").write_text("")  # the checkpoints deleted too
    tamper(tmp_path / "cut-both", f"DELETE FROM outbox WHERE seq = {last}")
    unseen = cli(tmp_path / "cut-both", {}, "audit", "verify")
    assert unseen.returncode == 0  # what is left agrees with itself...
    seen = cli(tmp_path / "cut-both", {}, "audit", "verify", "--expect-head", head)
    assert seen.returncode == 1  # ...but not with the head an operator kept
    assert f"record {last}: records {last}..{last} are missing: the chain ends before the expected head" in seen.stderr


@pytest.mark.timeout(300)
async def test_a_second_shipper_on_the_same_outbox_exits_naming_the_first(tmp_path: Path) -> None:
    env = {"CASTELLAN_AUDIT__SHIP": "true", "CASTELLAN_AUDIT__SHIP_INTERVAL_SECONDS": "0.2"}
    with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
        status = tmp_path / "gw" / "shipper-status.json"

        async def running() -> bool:
            return status.is_file()

        await until(running, 90)
        child = json.loads(status.read_text())["pid"]
        second = await asyncio.to_thread(run_cli, gw, "ship")
        assert second.returncode == 3
        assert f"another shipper (pid {child}) is shipping audit.db; only one may run per outbox" in second.stderr
        token = gw.token("shipped", ["analysts"])
        await raw_call(gw, token, "echo", {"text": "still shipping"})

        async def shipped() -> bool:
            return await metric(gw, "castellan_audit_shipped_calls") >= 1

        await until(shipped, 90)
        assert await shipped()
        assert json.loads(status.read_text())["pid"] == child  # the first one, untouched


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of `megabytes` at `path` (root only; the test is skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fills `disk` to the last byte; unbuffered, so closing the file cannot raise ENOSPC again."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as fh:
        block = b"\0" * 65536
        while block:
            try:
                fh.write(block)
            except OSError:
                block = block[: len(block) // 2]
    return filler


@pytest.mark.timeout(600)
async def test_a_full_disk_is_reported_and_the_shipper_survives_it_and_ships_everything_after(tmp_path: Path) -> None:
    from server.auth.devkeys import mint_dev_token

    with run_mlflow(tmp_path / "mlflow") as mlflow, small_disk(tmp_path / "disk", 48) as disk:
        env = {
            **shipping_env(mlflow.url),
            "CASTELLAN_DATA_DIR": str(disk),  # the gateway's files on the small disk; its log beside it
            "CASTELLAN_AUDIT__MIN_FREE_DISK_MB": "4",
        }
        with run_gateway(tmp_path / "gw", env, timeout=120) as gw:
            token = mint_dev_token(disk, agent="disk", issuer=gw.issuer, audience=gw.mcp_url, groups=["analysts"])

            async def ready() -> dict[str, Any]:
                async with aiohttp.ClientSession() as s, s.get(f"{gw.base_url}/readyz") as resp:
                    return {"code": resp.status, **(await resp.json())}

            async def calls(n: int, first: int) -> list[dict[str, object]]:
                return [await raw_call(gw, token, "echo", {"text": f"call {first + i}"}) for i in range(n)]

            await calls(10, 0)
            assert (await ready())["status"] == "ready"

            async def child() -> bool:
                return (disk / "shipper-status.json").is_file()

            await until(child, 90)
            shipper_pid = json.loads((disk / "shipper-status.json").read_text())["pid"]
            filler = await asyncio.to_thread(fill, disk)
            during = await calls(20, 10)
            assert all("isError" in r for r in during)  # each a tool result (allowed, or refused): no crash
            full = await ready()
            assert full["checks"]["disk"].startswith("degraded: 0 MB free"), full
            refused = [r for r in during if r["isError"]]
            if refused:  # an outbox that cannot write is not ready, and calls fail closed
                assert full["code"] == 503, full
                assert "cannot write" in full["checks"]["audit"], full

            filler.unlink()
            await calls(10, 30)
            audited = outbox_rows(disk, "SELECT COUNT(*) FROM outbox WHERE kind = 'decision'")[0][0]

            async def drained() -> bool:
                return (
                    await metric(gw, "castellan_audit_unshipped_records") == 0
                    and await metric(gw, "castellan_audit_shipped_calls") >= audited
                )

            await until(drained, 240)
            assert await drained(), gw.log()[-3000:]
            traces = await asyncio.to_thread(traces_by_call, mlflow.url)
            assert len(traces) == audited  # every audited call, once
            assert json.loads((disk / "shipper-status.json").read_text())["pid"] == shipper_pid  # it survived

            async def recovered() -> bool:
                return (await ready())["status"] == "ready"

            await until(recovered, 60)
            assert (await ready())["status"] == "ready"


@pytest.mark.timeout(300)
def test_retention_keeps_the_local_mlflow_store_within_its_cap(tmp_path: Path) -> None:
    from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
    from server.audit.outbox import PendingCall
    from server.audit.traces import plan_trace

    target = MlflowTarget(local_tracking_uri(tmp_path), "castellan-audit")
    old = time.time() - 10 * 86_400
    plans = []
    for i in range(30):
        at = old + i if i < 5 else time.time() - 30 + i  # distinct times: "oldest" is well defined
        record = {"call_id": f"c{i}", "time": datetime.fromtimestamp(at, UTC).isoformat(), "tool": "echo",
                  "decision": "deny", "stage": "policy", "reasons": ["no"], "timings_ms": {"policy": 0.2}}  # fmt: skip
        plans.append(plan_trace(PendingCall(f"c{i}", [i + 1], record, at, None)))
    target.write(plans)

    def count(table: str) -> int:
        with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    assert (count("trace_info"), count("spans")) == (30, 60)
    assert target.prune(7 * 86_400, None) == 5  # older than 7 days
    assert target.prune(None, 10) == 15  # the oldest beyond the cap
    assert (count("trace_info"), count("spans")) == (10, 20)
    kept = {t["call_id"] for t in target.search(AuditQuery(limit=100))}
    assert kept == {f"c{i}" for i in range(20, 30)}  # the newest
