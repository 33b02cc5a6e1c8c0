"""One redactor, every sink: the audit outbox (reasons included), the logs, the decision log, the traces
built for MLflow and the exports. Secrets are fresh each run (tests/secret_shapes.py)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from server.audit.keys import ChainKey, load_chain_key
from server.audit.outbox import PendingCall, SqliteOutbox
from server.audit.records import decision_record, outcome_record
from server.audit.redaction import Redactor
from server.audit.traces import plan_trace
from server.cli import main
from server.errors import Denied, InvalidArguments
from server.logs import configure_logging
from server.policy._input import build_input
from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog
from server.policy.engine import Decision
from server.registry import ToolOutput
from server.settings import REPO_ROOT, AuditSettings
from tests.fakes.backends import allowed, make_call
from tests.secret_shapes import SEED, SHAPES, Secret, leaks, secret_field

pytestmark = pytest.mark.anyio


@pytest.fixture
def secrets() -> list[Secret]:
    """One fresh secret of every shape."""
    return [shape() for shape in SHAPES]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor.from_settings(AuditSettings())


def files_under(root: Path) -> bytes:
    """Every byte of every file under `root` (databases, their WAL, logs, exports)."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def text_of(secrets: list[Secret]) -> str:
    return " | ".join(s.text for s in secrets)


def calls_with(secrets: list[Secret]) -> list[tuple[str, object]]:
    """The calls an agent can make that put `secrets` in each part of a record."""
    text = text_of(secrets)
    field, value = secret_field()
    arguments = {"text": text, "nested": [{"note": text}], field: value}
    return [
        # allowed: arguments and the result preview
        ("allowed", allowed(make_call(arguments=arguments), output=ToolOutput(text=f"you said {text}"))),
        # refused with the secret in the reason (invalid arguments echo the value)
        ("invalid", make_call(arguments=arguments, error=InvalidArguments("resolve", f"text: {text!r} is too long"))),
        # an unknown tool named with a secret: the name and the reason
        ("unknown", make_call(tool_name=text[:128], tool=None, error=Denied("resolve", f"unknown tool {text!r}"))),
    ]


def test_the_outbox_stores_no_secret_in_arguments_reasons_or_results(
    tmp_path: Path, secrets: list[Secret], redactor: Redactor
) -> None:
    import asyncio

    async def write() -> None:
        outbox = SqliteOutbox(tmp_path / "audit.db", key=ChainKey.generate())
        for _, call in calls_with(secrets):
            await outbox.write("decision", call.call_id, decision_record(call, redactor))  # type: ignore[arg-type]
            await outbox.write("outcome", call.call_id, outcome_record(call, 0.0, redactor))  # type: ignore[arg-type]
        await outbox.close()

    asyncio.run(write())
    assert not leaks(files_under(tmp_path), secrets), f"seed {SEED}"
    assert b"[REDACTED]" in files_under(tmp_path)


def test_traces_for_mlflow_hold_no_secret(secrets: list[Secret], redactor: Redactor) -> None:
    for _, call in calls_with(secrets):
        pending = PendingCall(
            call.call_id,  # type: ignore[attr-defined]
            [1, 2],
            decision_record(call, redactor),  # type: ignore[arg-type]
            1.0,
            outcome_record(call, 2.0, redactor),  # type: ignore[arg-type]
        )
        plan = plan_trace(pending)
        assert not leaks(repr(plan), secrets), f"seed {SEED}"


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", "info", stream=stream)
    yield stream
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level


def test_logs_hold_no_secret(captured_logs: io.StringIO, secrets: list[Secret]) -> None:
    text = text_of(secrets)
    log = structlog.get_logger("castellan.test")
    log.info("tool_call", tool=text[:128], decision="deny", reasons=[f"unknown tool {text!r}"])
    try:
        raise ValueError(text)
    except ValueError:
        log.exception("stage_failed")
    logging.getLogger("uvicorn.error").warning("stdlib says %s", text)
    written = captured_logs.getvalue()
    assert len(written.splitlines()) >= 3
    assert not leaks(written, secrets), f"seed {SEED}"


def test_the_decision_log_holds_no_secret_the_mask_rules_miss(
    tmp_path: Path, secrets: list[Secret], redactor: Redactor
) -> None:
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    log = DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision", redactor)
    text = text_of(secrets)
    field, value = secret_field()
    call = make_call(arguments={"text": text, "password": "hunter2hunter2", field: value, "deep": {"x": [text]}})
    log.emit(build_input(call), Decision(allow=False, reasons=(f"argument text is {text!r}",), engine="opa"))
    log.close()
    written = (tmp_path / "decisions.jsonl").read_text()
    assert not leaks(written, secrets, (value, "hunter2hunter2")), f"seed {SEED}"
    event = json.loads(written)
    assert event["erased"] == [
        "/input/arguments/password",
        "/input/normalized/arguments/password",
        "/input/normalized/strings",  # every string at any depth, some from the password
    ]


def test_exports_redact_records_written_before_a_detector_existed(
    tmp_path: Path, secrets: list[Secret], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    text = text_of(secrets)
    data = tmp_path / "data"

    async def write_unredacted() -> None:
        key = load_chain_key(key=None, key_file=None, data_dir=data, environment="dev")  # as the gateway would
        outbox = SqliteOutbox(data / "audit.db", key=key)
        record = {"call_id": "c1", "time": "2026-11-23T12:00:00+00:00", "tool": "echo", "agent_id": "bot"}
        record |= {"decision": "deny", "reasons": [text], "arguments": {"q": text}}
        await outbox.write("decision", "c1", record)
        await outbox.close()

    data.mkdir()
    asyncio.run(write_unredacted())
    monkeypatch.setenv("CASTELLAN_DATA_DIR", str(data))
    exports = tmp_path / "exports"
    exports.mkdir()
    runner = CliRunner()
    for fmt in ("csv", "jsonl", "parquet"):
        done = runner.invoke(main, ["audit", "search", "--format", fmt, "-o", str(exports / f"calls.{fmt}")])
        assert done.exit_code == 0, done.output
    table = runner.invoke(main, ["audit", "search"])
    assert table.exit_code == 0, table.output
    assert not leaks(files_under(exports) + table.output.encode(), secrets), f"seed {SEED}"
    assert "[REDACTED]" in (exports / "calls.csv").read_text()


def test_a_secret_in_the_arguments_is_marked_once_in_the_record(redactor: Redactor) -> None:
    call = allowed(make_call(arguments={"text": "connect with password=hunter2hunter2"}))
    record = decision_record(call, redactor)
    assert record["arguments"]["text"] == "connect with password=[REDACTED]"
    done = call.evolve(output=ToolOutput(text="echo: password=hunter2hunter2"))
    assert outcome_record(done, 0.0, redactor)["result_preview"] == "echo: password=[REDACTED]"


def test_the_redactor_leaves_no_member_unscanned_whatever_its_container() -> None:
    from types import MappingProxyType

    redactor = Redactor(["ssn"])
    value = {
        "ssn": "123-45-6789",
        "api_token": "q8Zr2LmX0pVt7NcK4wYs",
        "password=hunter2hunter2": ("token=abcdefgh1234", MappingProxyType({"ssn": 1})),
        7: ["Bearer abcdefghijklmnop"],
    }
    assert redactor.apply(value) == {
        "ssn": "[REDACTED]",
        "api_token": "[REDACTED]",
        "password=[REDACTED]": ["token=[REDACTED]", {"ssn": "[REDACTED]"}],
        7: ["Bearer [REDACTED]"],
    }
