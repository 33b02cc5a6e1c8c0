"""The fault suite: each fault of issue 15 injected under load against real processes, with counts.

Every test drives a real `castellan serve` with four agents' worth of concurrent calls (echo, and a
blocked text the default policy denies, each with a unique text so the audit record of every call is
found), injects one fault, lets the gateway recover by itself and accounts for every call: what the
agent was told, what the outbox recorded (decision and outcome), what reached a real `mlflow server`
(where shipping is on), and what the meter still holds. Each test adds a row to the table printed at
the end of the module (and written to `fault-table.md` in pytest's base temp directory); every row
must end with nothing lost and nothing held. Timings are reported, never asserted.

Faults: SIGKILL of the gateway mid-calls (then a restart), a full disk (a small tmpfs, root only),
the meters database write-locked by another process while tools run, OPA stalled (SIGSTOP/SIGCONT),
SIGTERM with calls running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.load import call_body, call_headers
from tests.gateway_process import GatewayProcess, castellan, cli_env, run_gateway
from tests.integration.conftest import run_cli
from tests.integration.test_audit_integrity import fill, small_disk
from tests.integration.test_audit_shipping import metric, shipping_env, until
from tests.mlflow_server import MlflowServer, run_mlflow
from tests.opa import opa_binary, run_opa

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

AGENT = "fault-bot"
BLOCKED = "please DROP TABLE users"  # denied by the default policy's blocked words
LIMITS = {
    "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
    "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_IDENTICAL_CALLS": "0",
    "CASTELLAN_METERING__LIMITS__MAX_CALLS_PER_TOOL": "0",
    # A concurrency limit and a budget: every admitted call holds a reservation until it is settled.
    "CASTELLAN_METERING__AGENTS": json.dumps({AGENT: {"concurrent_calls": 64, "tokens_per_day": 50_000_000}}),
    "CASTELLAN_METERING__RESERVATION_TTL_SECONDS": "600",  # a leak would outlive the test
}
SLOW_TOOLS = {
    "CASTELLAN_TOOLS__FUNCTION_MODULES": json.dumps(["tests.fixtures.functions"]),
    "CASTELLAN_TOOLS__FUNCTION_TIMEOUT_SECONDS": "120",
}
# Slow calls of one agent run side by side (by default one identity holds one function worker).
PARALLEL_TOOLS = {
    "CASTELLAN_TOOLS__FUNCTION_WORKERS": "4",
    "CASTELLAN_TOOLS__FUNCTION_WORKERS_PER_IDENTITY": "4",
}
START = 90.0  # gateway start-up on a loaded 2-core machine
ROWS: list[Row] = []


@dataclass
class Sent:
    """One call as the agent saw it: its unique text, and the result or the connection error."""

    tool: str
    text: str
    result: dict[str, Any] | None = None
    cut: str | None = None  # the connection failed: the gateway died or stopped accepting

    @property
    def allowed(self) -> bool:
        return self.result is not None and not self.result.get("isError")

    def reasons(self) -> list[str]:
        if self.result is None or not self.result.get("isError"):
            return []
        text = self.result["content"][0]["text"]
        try:
            body = json.loads(text)
        except ValueError:
            return [text[:80]]
        return list(body.get("reasons", [])) if isinstance(body, dict) else [text[:80]]


@dataclass
class Row:
    fault: str
    made: int = 0
    allowed: int = 0
    denied: collections.Counter[str] = field(default_factory=collections.Counter)
    cut: int = 0
    decisions: int = 0
    outcomes: int = 0
    interrupted: int = 0
    shipped: str = "off"
    held: str = ""
    recover: str = ""
    lost: int = 0


@pytest.fixture(scope="module", autouse=True)
def table(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if not ROWS:
        return
    text = render(ROWS)
    (tmp_path_factory.getbasetemp() / "fault-table.md").write_text(text)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\n" + text, flush=True)  # past the capture: the table is the suite's report


def render(rows: list[Row]) -> str:
    head = (
        "| fault | calls made | allowed | denied (reason: count) | cut off | audited decision / outcome "
        "| interrupted | shipped to MLflow once | reservations held after | time to recover | lost |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        denied = "; ".join(f"{reason}: {n}" for reason, n in r.denied.most_common()) or "0"
        lines.append(
            f"| {r.fault} | {r.made} | {r.allowed} | {sum(r.denied.values())} ({denied}) | {r.cut} "
            f"| {r.decisions} / {r.outcomes} | {r.interrupted} | {r.shipped} | {r.held} | {r.recover} | {r.lost} |"
        )
    return "\n".join(lines) + "\n"


async def load(
    gw: GatewayProcess, token: str, stop: asyncio.Event, tag: str, sent: list[Sent], workers: int = 4
) -> None:
    """Calls until `stop`: echo with a unique text, every fifth one a blocked text (denied by policy).
    A worker stops at its first connection error (the gateway is gone)."""

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            text = f"{BLOCKED} {tag}-{n}-{i}" if i % 5 == 0 else f"{tag}-{n}-{i}"
            call = Sent("echo", text)
            sent.append(call)
            try:
                async with session.post(
                    gw.mcp_url, data=call_body("echo", {"text": text}, i), headers=call_headers("echo", token)
                ) as r:
                    assert r.status == 200, await r.text()
                    call.result = (await r.json())["result"]
            except (TimeoutError, aiohttp.ClientError) as exc:
                call.cut = type(exc).__name__
                return

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session, n) for n in range(workers)))


async def slow_call(gw: GatewayProcess, token: str, seconds: float, call: Sent) -> None:
    body = call_body("main.tests.sleep", {"seconds": seconds}, 1)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
            session.post(gw.mcp_url, data=body, headers=call_headers("main.tests.sleep", token)) as r,
        ):
            call.result = (await r.json())["result"] if r.status == 200 else {"isError": True, "http": r.status}
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        call.cut = type(exc).__name__


def outbox(data_dir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every decision record (in order) and every outcome by call id."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'audit.db'}?mode=ro", uri=True)) as db:
        decisions = [
            json.loads(r[0]) for r in db.execute("SELECT record FROM outbox WHERE kind = 'decision' ORDER BY seq")
        ]
        outcomes = {
            r[0]: json.loads(r[1]) for r in db.execute("SELECT call_id, record FROM outbox WHERE kind = 'outcome'")
        }
    return decisions, outcomes


def interrupted_mismatch(data_dir: Path, open_calls: list[str], closed: float) -> str:
    """Why the restarted gateway closed a different number of calls than the outbox showed open after
    the kill: the calls each side counted, and every record of the calls only one side counted."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'audit.db'}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT seq, kind, call_id, instance, shipped_at, record FROM outbox ORDER BY seq").fetchall()
    # the restart's interrupted outcomes may still be in its group commit
    interrupted = sorted(r[2] for r in rows if r[1] == "outcome" and json.loads(r[5]).get("interrupted"))
    differ = set(open_calls).symmetric_difference(interrupted)
    differing = [(*r[:5], r[5][:300]) for r in rows if r[2] in differ]
    return (
        f"closed {closed} at restart, {len(open_calls)} open after the kill; open then: {open_calls};"
        f" interrupted outcomes now: {interrupted}; records of the calls that differ: {differing}"
    )


async def outbox_settled(data_dir: Path, seconds: float = 30.0) -> None:
    """Waits (bounded) until every allowed decision in the outbox has its outcome (read from the outbox
    itself; tests/audit_trail.py waits the same way through the CLI): a running gateway group-commits
    outcomes just after the response (audit.outcome_commit_seconds), later on a loaded machine."""

    async def complete() -> bool:
        decisions, outcomes = outbox(data_dir)
        return all(d["call_id"] in outcomes for d in decisions if d.get("decision") == "allow")

    await until(complete, seconds)


def account(row: Row, sent: list[Sent], data_dir: Path, *, full_disk: bool = False) -> list[str]:
    """Fills the counts of `row` from what the agent saw and what the outbox holds; returns the problems.

    Lost: a call the agent saw allowed with no allow decision and outcome in the audit, a refusal that
    is not audited (on a `full_disk` the caller checks those against the server log instead: a refusal
    whose record the disk could not take), an allowed decision without an outcome."""
    decisions, outcomes = outbox(data_dir)
    by_text: dict[str, dict[str, Any]] = {}
    slow: list[dict[str, Any]] = []
    for d in decisions:
        if d.get("tool") == "main.tests.sleep":
            slow.append(d)
        elif isinstance(d.get("arguments"), dict) and isinstance(d["arguments"].get("text"), str):
            by_text[d["arguments"]["text"]] = d
    problems: list[str] = []
    row.made = len(sent)
    row.allowed = sum(s.allowed for s in sent)
    row.cut = sum(s.cut is not None for s in sent)
    for s in sent:
        for reason in s.reasons():
            row.denied[reason] += 1
    mine = [d for d in decisions if d.get("agent_id") == AGENT]
    row.decisions = len(mine)
    row.outcomes = sum(d["call_id"] in outcomes for d in mine)
    row.interrupted = sum(bool(outcomes.get(d["call_id"], {}).get("interrupted")) for d in mine)
    for s in sent:
        if s.tool != "echo":
            continue
        d = by_text.get(s.text)
        if s.allowed and (d is None or d["decision"] != "allow" or d["call_id"] not in outcomes):
            problems.append(f"allowed but not audited: {s.text}")
        elif s.result is not None and not s.allowed:
            if d is None:
                if not full_disk:
                    problems.append(f"refused but not audited: {s.text} {s.reasons()}")
            elif d["decision"] == "allow" and d["call_id"] not in outcomes:
                problems.append(f"allowed decision without an outcome: {s.text}")
    for d in [*by_text.values(), *slow]:
        if d["decision"] == "allow" and d["call_id"] not in outcomes:
            problems.append(f"allowed decision {d['call_id']} without an outcome")
    row.lost = len(problems)
    return problems


async def usage(gw: GatewayProcess) -> tuple[int, int]:
    """(calls in flight, tokens reserved) for the load agent, from the gateway's admin API."""
    admin = gw.token("ops", scopes=["castellan:admin"])
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.base_url}/admin/usage", params={"agent": AGENT}, headers={"authorization": f"Bearer {admin}"}) as r,
    ):
        assert r.status == 200, await r.text()
        body = await r.json()
    return int(body["in_flight"]), int(body["reserved_tokens"])


async def settled(gw: GatewayProcess, seconds: float = 60.0) -> tuple[int, int]:
    """Waits (bounded) for the meter to hold nothing for the agent, then returns what it holds."""

    async def free() -> bool:
        return await usage(gw) == (0, 0)

    await until(free, seconds)
    return await usage(gw)


async def labelled(gw: GatewayProcess, name: str, **labels: str) -> float:
    """A labelled counter from /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as session, session.get(f"{gw.base_url}/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and " " in line:
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1 : -1].split(",")))
            if got == want:
                return float(value)
    return 0.0


def held(in_flight: int, tokens: int) -> str:
    return f"{in_flight} calls / {tokens} tokens"


def trace_counts(tracking_uri: str, experiment_name: str) -> collections.Counter[str]:
    """How many traces each call id has in `experiment_name`, paging through all of them."""
    from mlflow.tracing.client import TracingClient
    from mlflow.tracking import MlflowClient

    found: collections.Counter[str] = collections.Counter()
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(experiment_name)
    if experiment is None:
        return found
    client = TracingClient(tracking_uri)
    token = None
    while True:
        page = client.search_traces(
            locations=[experiment.experiment_id], max_results=500, page_token=token, include_spans=False
        )
        found.update(t.info.tags["castellan.call_id"] for t in page)
        token = page.token
        if not token:
            return found


async def shipped_once(gw: GatewayProcess, mlflow: MlflowServer, experiment: str, seconds: float = 240.0) -> str:
    """Waits for the outbox to drain, then checks every call id in the outbox is one trace in MLflow."""

    async def drained() -> bool:
        return await metric(gw, "castellan_audit_unshipped_records") == 0

    await until(drained, seconds)
    assert await drained(), gw.log()[-3000:]
    with contextlib.closing(sqlite3.connect(f"file:{gw.data_dir / 'audit.db'}?mode=ro", uri=True)) as db:
        ids = {r[0] for r in db.execute("SELECT DISTINCT call_id FROM outbox WHERE kind IN ('decision', 'outcome')")}
    counts = await asyncio.to_thread(trace_counts, mlflow.url, experiment)
    twice = [c for c, n in counts.items() if n > 1]
    assert twice == [], f"shipped more than once: {twice[:5]}"
    assert set(counts) == ids, f"missing in MLflow: {len(ids - set(counts))}, unknown: {len(set(counts) - ids)}"
    return f"{len(counts)} of {len(ids)}"


def shippers(data_dir: Path) -> list[int]:
    """Live `castellan ship` processes on this data directory (any parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = next(x for x in (entry / "status").read_text().splitlines() if x.startswith("State:"))
        except (OSError, StopIteration):
            continue
        mine = b"ship" in cmdline and b"server" in cmdline and f"CASTELLAN_DATA_DIR={data_dir}".encode() in environ
        if mine and "Z" not in state.split()[1]:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        state = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:"))
    except (OSError, StopIteration):
        return True
    return "Z" in state.split()[1]


def audit_cli(data_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return castellan(*args, env=cli_env(data_dir, env), timeout=180)


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with run_mlflow(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


async def grant_test_functions(gw: GatewayProcess) -> None:
    """Analysts may call the fixture functions (`main.tests.*`: the slow tools the faults cut off)."""
    granted = await asyncio.to_thread(
        run_cli, gw, "grants", "grant", "USE", "SCHEMA,", "EXECUTE", "ON", "SCHEMA", "main.tests", "TO", "analysts"
    )
    assert granted.returncode == 0, granted.stderr


@pytest.mark.timeout(600)
async def test_sigkill_mid_calls_then_restart(tmp_path: Path, mlflow: MlflowServer) -> None:
    row = Row("SIGKILL of the gateway mid-calls (shipper and managed OPA children), then restart")
    env = {
        **shipping_env(mlflow.url),
        **LIMITS,
        **SLOW_TOOLS,
        "CASTELLAN_AUDIT__MLFLOW_EXPERIMENT": "faults-sigkill",
        # A managed OPA: the gateway's other child, which must die with it too.
        "CASTELLAN_POLICY__ENGINE": "auto",
        "CASTELLAN_POLICY__OPA_BINARY": opa_binary(),
    }
    data = tmp_path / "gw"
    sent: list[Sent] = []
    with run_gateway(data, env, timeout=START) as gw:
        await grant_test_functions(gw)
        token = gw.token(AGENT, ["analysts"])

        async def has_shipper() -> bool:
            return (data / "shipper-status.json").is_file()

        await until(has_shipper, 90)
        shipper = json.loads((data / "shipper-status.json").read_text())["pid"]
        started = re.search(r'"pid": (\d+), "event": "opa_started"', gw.log())
        assert started is not None, gw.log()[-3000:]
        managed_opa = int(started.group(1))
        stop = asyncio.Event()
        running = asyncio.create_task(load(gw, token, stop, "kill", sent))
        slow = [Sent("main.tests.sleep", f"slow-{i}") for i in range(3)]
        sleeping = [asyncio.create_task(slow_call(gw, token, 60, s)) for s in slow]
        sent += slow

        async def slow_decided() -> bool:
            decisions, _ = outbox(data)
            return sum(d.get("tool") == "main.tests.sleep" for d in decisions) == 3

        await until(slow_decided, 60)
        assert await slow_decided(), gw.log()[-3000:]
        await asyncio.sleep(1.0)
        held_before = await usage(gw)
        gw.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(gw.process.wait)
        stop.set()
        await running
        await asyncio.gather(*sleeping)

    for _ in range(100):  # the parent-death signal reaches the children at once; allow for a loaded box
        if gone(shipper) and gone(managed_opa):
            break
        await asyncio.sleep(0.1)
    assert gone(shipper), f"the shipper (pid {shipper}) outlived the SIGKILLed gateway"
    assert gone(managed_opa), f"the managed OPA (pid {managed_opa}) outlived the SIGKILLed gateway"
    assert shippers(data) == []
    decisions, outcomes = outbox(data)
    open_calls = sorted(d["call_id"] for d in decisions if d["decision"] == "allow" and d["call_id"] not in outcomes)
    assert len(open_calls) >= 3  # the three sleeping calls at least

    restarted = time.monotonic()
    with run_gateway(data, env, timeout=START) as gw:
        after = await settled(gw, 30)
        recovered = time.monotonic() - restarted
        assert after == (0, 0), f"held after the restart: {after} (before the kill: {held_before})"
        closed = await metric(gw, "castellan_audit_interrupted_calls")
        assert closed == len(open_calls), interrupted_mismatch(data, open_calls, closed)

        async def one_shipper() -> bool:
            return len(shippers(data)) == 1

        await until(one_shipper, 60)
        assert len(shippers(data)) == 1, shippers(data)
        more: list[Sent] = []
        stop = asyncio.Event()
        running = asyncio.create_task(load(gw, gw.token(AGENT, ["analysts"]), stop, "after-kill", more))
        await asyncio.sleep(3.0)
        stop.set()
        await running
        sent += more
        assert more
        assert all(s.result is not None for s in more)
        row.shipped = await shipped_once(gw, mlflow, "faults-sigkill")
        assert len(shippers(data)) == 1
        found = await asyncio.to_thread(
            audit_cli, data, env, "audit", "search", "--outcome", "interrupted", "--format", "jsonl"
        )
        assert found.returncode == 0, found.stderr
        assert sorted(json.loads(line)["call_id"] for line in found.stdout.splitlines()) == open_calls
        verified = await asyncio.to_thread(audit_cli, data, env, "audit", "verify")
        assert verified.returncode == 0, verified.stderr
        assert f"{len(open_calls)} call(s) interrupted by a crash" in verified.stderr
        row.held = held(*await settled(gw))
    problems = account(row, sent, data)
    row.recover = f"{recovered:.1f} s (restart to ready, limits free; start-up included)"
    ROWS.append(row)
    assert problems == []
    assert row.interrupted == len(open_calls)
    assert row.held == held(0, 0)
    assert all(s.cut is not None for s in slow)


@pytest.mark.timeout(600)
async def test_full_disk_under_load(tmp_path: Path, mlflow: MlflowServer) -> None:
    row = Row("full disk (48 MB tmpfs filled), then space freed")
    with small_disk(tmp_path / "disk", 48) as disk:
        env = {
            **shipping_env(mlflow.url),
            **LIMITS,
            "CASTELLAN_DATA_DIR": str(disk),  # the gateway's files on the small disk; its log beside it
            "CASTELLAN_AUDIT__MIN_FREE_DISK_MB": "4",
            "CASTELLAN_AUDIT__MLFLOW_EXPERIMENT": "faults-disk",
        }
        sent: list[Sent] = []
        with run_gateway(tmp_path / "gw", env, timeout=START) as gw:
            gw.data_dir = disk  # the data directory is the tmpfs (tokens, audit.db); the log is outside
            token = gw.token(AGENT, ["analysts"])

            async def has_shipper() -> bool:
                return (disk / "shipper-status.json").is_file()

            await until(has_shipper, 90)
            shipper = json.loads((disk / "shipper-status.json").read_text())["pid"]
            stop = asyncio.Event()
            running = asyncio.create_task(load(gw, token, stop, "disk", sent))
            await asyncio.sleep(2.0)
            filler = await asyncio.to_thread(fill, disk)
            await asyncio.sleep(4.0)
            async with aiohttp.ClientSession() as s, s.get(f"{gw.base_url}/readyz") as resp:
                full_ready = (resp.status, await resp.json())
            filler.unlink()
            freed = time.monotonic()

            async def ready() -> bool:
                async with aiohttp.ClientSession() as s, s.get(f"{gw.base_url}/readyz") as resp:
                    return resp.status == 200

            await until(ready, 60)
            await asyncio.sleep(2.0)
            stop.set()
            await running
            row.shipped = await shipped_once(gw, mlflow, "faults-disk")
            recovered = time.monotonic() - freed
            assert json.loads((disk / "shipper-status.json").read_text())["pid"] == shipper  # it survived
            row.held = held(*await settled(gw))
            problems = account(row, sent, disk, full_disk=True)
            unaudited = unaudited_refusals(gw, disk)
            audited_refusals = sum(d["decision"] != "allow" for d in outbox(disk)[0] if d["agent_id"] == AGENT)
    row.recover = f"{recovered:.1f} s (space freed to all shipped, same shipper)"
    ROWS.append(row)
    assert full_ready[1]["checks"]["disk"].startswith("degraded"), full_ready
    assert problems == []
    # A refusal the full disk could not audit is in the server log (on another disk), one for one.
    told = sum(s.result is not None and not s.allowed for s in sent) - audited_refusals
    assert unaudited == told, (unaudited, told)
    row.recover += f"; {unaudited} refusals not auditable on the full disk, each in the server log"
    assert row.held == held(0, 0)
    assert all(s.result is not None for s in sent)  # every call answered with a tool result: no crash, no 500
    after = [s for s in sent if s.text.startswith("disk-") and not s.text.startswith(BLOCKED)][-4:]
    assert all(s.allowed for s in after), "calls after space returned were not served"


def unaudited_refusals(gw: GatewayProcess, data_dir: Path) -> int:
    """Refusals of the load agent in the server log (`tool_call` events) that the outbox has not."""
    recorded = {d["call_id"] for d in outbox(data_dir)[0]}
    count = 0
    for line in gw.log().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "tool_call" and event.get("agent_id") == AGENT and event["decision"] != "allow":
                count += event["call_id"] not in recorded
    return count


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
print("released", flush=True)
"""


@pytest.mark.timeout(600)
async def test_meters_database_locked_while_tools_run(tmp_path: Path) -> None:
    row = Row("meters.db write-locked by another process (25 s; busy timeout 10 s) while 4 tools run")
    env = {**LIMITS, **SLOW_TOOLS, **PARALLEL_TOOLS}
    data = tmp_path / "gw"
    sent: list[Sent] = []
    with run_gateway(data, env, timeout=START) as gw:
        await grant_test_functions(gw)
        token = gw.token(AGENT, ["analysts"])
        stop = asyncio.Event()
        before = asyncio.create_task(load(gw, token, stop, "lock-before", sent))
        await asyncio.sleep(2.0)
        stop.set()
        await before
        # The meter runs its statements one at a time, each waiting up to the 10 s busy timeout (its
        # heartbeat among them): held 25 s, the lock outlasts at least one charge's wait, which fails
        # and is owed.
        slow = [Sent("main.tests.sleep", f"slow-{i}") for i in range(4)]
        sleeping = [asyncio.create_task(slow_call(gw, token, 3, s)) for s in slow]
        sent += slow

        async def slow_running() -> bool:
            return (await usage(gw))[0] >= len(slow)

        await until(slow_running, 60)
        assert await slow_running(), gw.log()[-3000:]
        locker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOCKER, str(data / "meters.db"), "25", stdout=asyncio.subprocess.PIPE
        )
        assert locker.stdout is not None
        assert (await locker.stdout.readline()).strip() == b"locked"
        await asyncio.gather(*sleeping)  # they finish while the lock is held: their charge waits on it
        assert (await locker.stdout.readline()).strip() == b"released"
        await locker.wait()
        released = time.monotonic()
        after = await settled(gw)
        recovered = time.monotonic() - released
        stop = asyncio.Event()
        later = asyncio.create_task(load(gw, token, stop, "lock-after", sent))
        await asyncio.sleep(2.0)
        stop.set()
        await later
        after = await settled(gw)
        row.held = held(*after)
        owed = await labelled(gw, "castellan_meter_retries_total", kind="settle", result="queued")
        written = await labelled(gw, "castellan_meter_retries_total", kind="settle", result="done")
        report = await asyncio.to_thread(audit_cli, data, env, "usage", "--agent", AGENT, "--json")
        assert report.returncode == 0, report.stderr
        charged = json.loads(report.stdout)
    problems = account(row, sent, data)
    row.recover = f"{recovered:.1f} s (lock released to nothing held; {owed:.0f} charges owed, {written:.0f} written)"
    ROWS.append(row)
    # The tools ran: each agent is told so (its result, never a denial), the audit has the outcome.
    assert all(s.allowed and "awake" in json.dumps(s.result) for s in slow), [s.result for s in slow]
    assert problems == []
    assert row.held == held(0, 0)
    assert owed >= 1, "no charge failed: the lock did not outlast the busy timeout"
    assert written == owed  # every owed charge was written once the lock went
    decisions, outcomes = outbox(data)
    spent = sum(
        outcomes[d["call_id"]]["tokens_in"] + outcomes[d["call_id"]]["tokens_out"]
        for d in decisions
        if d["agent_id"] == AGENT and d["call_id"] in outcomes
    )
    day = [w["used"] for w in charged["tokens"] if w["window"] == "day"]
    assert day == [spent], (day, spent)  # every call's tokens charged, the owed ones too, none twice
    assert any(s.allowed for s in sent if s.text.startswith("lock-after"))


@pytest.mark.timeout(600)
async def test_opa_stalled_under_load(tmp_path: Path) -> None:
    row = Row("OPA stalled (SIGSTOP 6 s, then SIGCONT)")
    with run_opa() as opa:
        env = {
            **LIMITS,
            "CASTELLAN_POLICY__ENGINE": "opa",
            "CASTELLAN_POLICY__OPA_URL": opa.url,
            "CASTELLAN_POLICY__TIMEOUT_SECONDS": "1",
        }
        sent: list[Sent] = []
        with run_gateway(tmp_path / "gw", env, timeout=START) as gw:
            stop = asyncio.Event()
            running = asyncio.create_task(load(gw, gw.token(AGENT, ["analysts"]), stop, "stall", sent))
            await asyncio.sleep(2.0)
            opa.process.send_signal(signal.SIGSTOP)
            await asyncio.sleep(6.0)
            opa.process.send_signal(signal.SIGCONT)
            continued = time.monotonic()
            mark = len(sent)

            async def allowing() -> bool:
                return any(s.allowed for s in sent[mark:])

            await until(allowing, 60)
            recovered = time.monotonic() - continued
            await asyncio.sleep(3.0)
            stop.set()
            await running
            row.held = held(*await settled(gw))
            await outbox_settled(gw.data_dir)
            problems = account(row, sent, gw.data_dir)
    row.recover = f"{recovered:.1f} s (SIGCONT to the first allowed call)"
    ROWS.append(row)
    assert problems == []
    assert row.held == held(0, 0)
    assert row.denied["policy engine unavailable"] > 0
    assert set(row.denied) <= {"policy engine unavailable", "blocked content"} | {
        r for r in row.denied if "blocked" in r or "DROP" in r or "drop" in r
    }
    assert all(s.result is not None for s in sent)
    tail = [s for s in sent[-8:] if not s.text.startswith(BLOCKED)]
    assert tail
    assert all(s.allowed for s in tail), "the gateway did not recover by itself"


@pytest.mark.timeout(600)
async def test_sigterm_with_calls_running(tmp_path: Path) -> None:
    row = Row("SIGTERM with tool calls running (4 s each)")
    env = {**LIMITS, **SLOW_TOOLS, **PARALLEL_TOOLS}
    data = tmp_path / "gw"
    sent: list[Sent] = []
    with run_gateway(data, env, timeout=START) as gw:
        await grant_test_functions(gw)
        token = gw.token(AGENT, ["analysts"])
        stop = asyncio.Event()
        running = asyncio.create_task(load(gw, token, stop, "term", sent))
        slow = [Sent("main.tests.sleep", f"slow-{i}") for i in range(3)]
        sleeping = [asyncio.create_task(slow_call(gw, token, 4, s)) for s in slow]
        sent += slow

        async def slow_running() -> bool:
            return (await usage(gw))[0] >= len(slow)

        await until(slow_running, 60)
        assert await slow_running(), gw.log()[-3000:]
        terminated = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*sleeping)
        stop.set()
        await running
        code = await asyncio.to_thread(gw.process.wait, 120)
        recovered = time.monotonic() - terminated
    report = await asyncio.to_thread(audit_cli, data, env, "usage", "--agent", AGENT, "--json")
    assert report.returncode == 0, report.stderr
    usage_after = json.loads(report.stdout)
    row.held = held(int(usage_after["in_flight"]), int(usage_after["reserved_tokens"]))
    problems = account(row, sent, data)
    row.recover = f"{recovered:.1f} s (SIGTERM to exit, running calls finished)"
    ROWS.append(row)
    # uvicorn re-raises the signal after its graceful shutdown: the exit status says "ended by SIGTERM"
    assert code in (0, -signal.SIGTERM), gw.log()[-3000:]
    assert "Application shutdown complete" in gw.log()
    assert all(s.allowed and "awake" in json.dumps(s.result) for s in slow), [(s.result, s.cut) for s in slow]
    assert problems == []
    assert row.held == held(0, 0)
