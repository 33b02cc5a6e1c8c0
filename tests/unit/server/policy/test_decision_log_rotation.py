"""`decisions.jsonl` is rotated by size, keeps a bounded number of old files, and never fails a call."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog
from server.policy.engine import Decision
from server.settings import REPO_ROOT, PolicySettings


def log_in(path: Path, max_bytes: int, keep: int) -> DecisionLog:
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    return DecisionLog(path / "decisions.jsonl", bundle, "castellan/gateway/decision", max_bytes=max_bytes, keep=keep)


def emit(log: DecisionLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        log.emit({"arguments": {"n": i, "text": "x" * 100}}, Decision(allow=True, decision_id=f"d{i}"))


def ids(path: Path) -> list[int]:
    return [int(json.loads(line)["decision_id"][1:]) for line in path.read_text().splitlines()]


def test_the_log_is_rotated_by_size_and_only_keep_files_are_kept(tmp_path: Path) -> None:
    log = log_in(tmp_path, max_bytes=4_000, keep=2)
    emit(log, 0, 200)
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["decisions.jsonl", "decisions.jsonl.1", "decisions.jsonl.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 4_000
    current, newer, older = (ids(tmp_path / n) for n in names)
    # Nothing is lost between the files kept, and they are in order: .2 oldest, the live file newest.
    assert older + newer + current == list(range(older[0], 200))
    assert len(current) > 0


def test_the_size_limit_counts_utf8_bytes_not_characters(tmp_path: Path) -> None:
    log = log_in(tmp_path, max_bytes=4_000, keep=1)
    for i in range(60):  # each "☕" is three bytes in the file (lines are UTF-8, not \u escapes)
        log.emit({"arguments": {"n": i, "text": "☕" * 100}}, Decision(allow=True, decision_id=f"d{i}"))
    log.close()
    for name in ("decisions.jsonl", "decisions.jsonl.1"):
        assert (tmp_path / name).stat().st_size <= 4_000
        assert "☕" * 100 in (tmp_path / name).read_text(encoding="utf-8")


def test_a_restarted_log_continues_the_file_and_its_size(tmp_path: Path) -> None:
    log = log_in(tmp_path, max_bytes=4_000, keep=1)
    emit(log, 0, 10)
    log.close()
    size = (tmp_path / "decisions.jsonl").stat().st_size
    log = log_in(tmp_path, max_bytes=4_000, keep=1)
    emit(log, 10, 200)
    log.close()
    assert not (tmp_path / "decisions.jsonl.2").exists()
    assert (tmp_path / "decisions.jsonl").stat().st_size <= 4_000
    assert size > 0
    assert ids(tmp_path / "decisions.jsonl.1")[-1] + 1 == ids(tmp_path / "decisions.jsonl")[0]


def test_no_rotation_without_a_limit_and_no_old_files_with_keep_zero(tmp_path: Path) -> None:
    unlimited = log_in(tmp_path / "a", max_bytes=0, keep=5)
    emit(unlimited, 0, 100)
    unlimited.close()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["decisions.jsonl"]
    assert len(ids(tmp_path / "a" / "decisions.jsonl")) == 100
    truncating = log_in(tmp_path / "b", max_bytes=2_000, keep=0)
    emit(truncating, 0, 100)
    truncating.close()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["decisions.jsonl"]
    assert ids(tmp_path / "b" / "decisions.jsonl")[-1] == 99


def test_the_defaults_are_bounded() -> None:
    settings = PolicySettings()
    assert (settings.decision_log_max_bytes, settings.decision_log_keep) == (100 * 1024 * 1024, 5)


class FullDisk:
    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_a_failed_write_is_counted_and_never_raised(tmp_path: Path) -> None:
    log = log_in(tmp_path, max_bytes=0, keep=1)
    log._file = FullDisk()  # type: ignore[assignment]
    emit(log, 0, 3)
    assert log.failures == 3
    log.close()
