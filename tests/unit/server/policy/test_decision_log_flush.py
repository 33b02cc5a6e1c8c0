"""`decisions.jsonl` is written through a buffer: every line reaches the file within the flush
interval, and by shutdown; with no interval, each line is written as it comes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog
from server.policy.engine import Decision
from server.settings import REPO_ROOT, PolicySettings


def log_in(tmp_path: Path, flush_seconds: float) -> DecisionLog:
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    return DecisionLog(tmp_path / "decisions.jsonl", bundle, "castellan/gateway/decision", flush_seconds=flush_seconds)


def emit(log: DecisionLog, count: int) -> None:
    for i in range(count):
        log.emit({"arguments": {"n": i}}, Decision(allow=True, decision_id=f"d{i}"))


def ids(path: Path) -> list[str]:
    return [json.loads(line)["decision_id"] for line in path.read_text().splitlines()]


def test_buffered_lines_all_reach_the_file_at_shutdown(tmp_path: Path) -> None:
    log = log_in(tmp_path, flush_seconds=3600)  # the interval never passes: only close writes them
    emit(log, 50)
    assert (tmp_path / "decisions.jsonl").read_text() == ""  # buffered: not a write per line
    log.close()
    assert ids(tmp_path / "decisions.jsonl") == [f"d{i}" for i in range(50)]


def test_buffered_lines_reach_the_file_within_the_interval_without_shutdown(tmp_path: Path) -> None:
    log = log_in(tmp_path, flush_seconds=0.05)
    for batch in range(3):  # the flusher comes back for lines written after its last flush
        emit(log, 5)
        deadline = time.monotonic() + 30  # a bound for a loaded machine, not a timing assertion
        while len(ids(tmp_path / "decisions.jsonl")) < 5 * (batch + 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(ids(tmp_path / "decisions.jsonl")) == 5 * (batch + 1)
    log.close()
    assert log.failures == 0


def test_without_an_interval_every_line_is_written_at_once(tmp_path: Path) -> None:
    log = log_in(tmp_path, flush_seconds=0)
    emit(log, 3)
    assert ids(tmp_path / "decisions.jsonl") == ["d0", "d1", "d2"]
    log.close()


def test_a_line_emitted_after_shutdown_is_counted_not_raised(tmp_path: Path) -> None:
    log = log_in(tmp_path, flush_seconds=1)
    emit(log, 1)
    log.close()
    emit(log, 1)
    assert log.failures == 1
    assert ids(tmp_path / "decisions.jsonl") == ["d0"]


def test_the_default_interval_is_a_second() -> None:
    assert PolicySettings().decision_log_flush_seconds == 1.0
