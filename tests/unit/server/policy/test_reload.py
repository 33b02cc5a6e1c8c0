"""Hot reload: only a settled, complete snapshot is verified and swapped in; a refusal keeps the last
good version deciding and is reported until the files match a deciding version again."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.errors import BackendUnavailable
from server.policy import reload
from server.policy.bundle import PolicyBundle, policy_files
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import LoadReport
from server.policy.reload import PolicyMetrics, PolicyWatcher, in_process_verifier, read_snapshot
from server.settings import REPO_ROOT

pytestmark = pytest.mark.anyio
ENTRYPOINT = "data.castellan.gateway.decision"
EXTRA = "castellan/extra.rego"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    shutil.copytree(REPO_ROOT / "policies", tmp_path / "policies")
    return tmp_path / "policies"


@pytest.fixture
async def engine(policies: Path) -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(PolicyBundle.from_directory(policies))
    yield engine
    await engine.close()


def watcher(policies: Path, engine: EmbeddedEngine) -> PolicyWatcher:
    return PolicyWatcher(policies, engine, quiet=1.0, verify=in_process_verifier(ENTRYPOINT))


async def settle(w: PolicyWatcher, clock: Clock) -> None:
    """Two reads of the same snapshot, the quiet period apart."""
    await w.poll()
    clock.now += 1.5
    await w.poll()


async def test_a_file_written_in_chunks_is_loaded_only_when_complete(
    policies: Path, engine: EmbeddedEngine, clock: Clock
) -> None:
    w = watcher(policies, engine)
    before = engine.policy_version
    target = policies / "castellan" / "gateway.rego"
    complete = target.read_text() + '\ndeny contains "no beta" if input.arguments.text == "beta"\n'
    with target.open("w") as f:
        for chunk in (complete[:900], complete[900:1800], complete[1800:]):
            f.write(chunk)
            f.flush()
            clock.now += 0.4  # pauses shorter than the quiet period
            assert await w.poll() is None
            assert engine.policy_version == before
    await settle(w, clock)
    assert engine.policy_version == PolicyBundle.from_directory(policies).version != before
    assert (w.reloads, w.refusals) == (1, 0)


async def test_an_ill_typed_edit_is_refused_and_the_last_good_version_decides(
    policies: Path, engine: EmbeddedEngine, clock: Clock
) -> None:
    w = watcher(policies, engine)
    before = engine.policy_version
    (policies / EXTRA).write_text("package castellan.gateway\n\nimport rego.v1\n\ndeny contains 42 if true\n")
    await settle(w, clock)
    assert engine.policy_version == before
    assert w.refused is not None
    assert "probe 'plain call': policy decision 'reasons' is not a set of strings" in w.refused.reasons
    status = w.status()
    assert status["version"] == before
    assert status["refused_edit"]["reasons"] == list(w.refused.reasons)
    # putting the files back to the version in force clears the refusal
    (policies / EXTRA).unlink()
    await settle(w, clock)
    assert w.refused is None
    assert (w.reloads, w.refusals) == (0, 1)


async def test_a_refused_snapshot_is_not_retried_on_every_poll(
    policies: Path, engine: EmbeddedEngine, clock: Clock
) -> None:
    w = watcher(policies, engine)
    (policies / EXTRA).write_text("package castellan.gateway\n\nthis is not rego {\n")
    await settle(w, clock)
    for _ in range(3):
        clock.now += 2
        await w.poll()
    assert w.refusals == 1


async def test_a_change_while_reading_is_no_snapshot(policies: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = reload.scan(policies)
    assert tree is not None
    (path, (ino, mtime, ctime, size)), *rest = tree.files
    changed = reload.Tree(tree.dirs, ((path, (ino, mtime + 1, ctime + 1, size + 1)), *rest))
    reads = iter([tree, changed])
    monkeypatch.setattr(reload, "scan", lambda root: next(reads))
    assert read_snapshot(policies) is None


class Reads:
    """Counts the policy files read (opened for their text)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Path.read_text

        def read_text(path: Path, *args: Any, **kwargs: Any) -> str:
            self.count += 1
            return original(path, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", read_text)


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The wall clock `seconds` on: files written so far are older than the racy window."""
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now + int(seconds * 1e9))


def test_a_snapshot_holds_the_files_a_bundle_is_made_of(policies: Path, tmp_path: Path) -> None:
    """The same files as `bundle.policy_files`: symlinked files read, symlinked directories not entered
    (a link back up the tree would otherwise be walked without end), other suffixes ignored."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared.rego").write_text("package castellan.shared\n\nx := 1\n")
    (policies / "castellan" / "linked_dir").symlink_to(outside, target_is_directory=True)
    (policies / "castellan" / "loop").symlink_to(policies, target_is_directory=True)
    (policies / "castellan" / "linked.rego").symlink_to(outside / "shared.rego")
    (policies / "castellan" / "notes.txt").write_text("not policy")
    snapshot = read_snapshot(policies)
    assert snapshot is not None
    expected = {p.relative_to(policies).as_posix() for p in policy_files(policies)}
    assert set(snapshot.files) == expected
    assert "castellan/linked.rego" in expected
    assert not any(name.startswith(("castellan/linked_dir/", "castellan/loop/")) for name in expected)


async def test_an_unchanged_directory_is_not_read_again(
    policies: Path, engine: EmbeddedEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    later(monkeypatch, 10)
    w = watcher(policies, engine)
    await w.poll()  # the files were written just now (racy): read once more, now 10 s after
    reads = Reads(monkeypatch)
    for _ in range(5):
        clock.now += 1
        assert await w.poll() is None
    assert reads.count == 0
    # and an edit is still seen, read, settled and loaded
    (policies / EXTRA).write_text(
        'package castellan.gateway\n\ndeny contains "no gamma" if input.arguments.text == "gamma"\n'
    )
    later(monkeypatch, 20)
    await settle(w, clock)
    assert reads.count > 0
    assert w.reloads == 1
    assert engine.policy_version == PolicyBundle.from_directory(policies).version


async def test_an_edit_that_restores_the_mtime_and_keeps_the_size_is_seen(
    policies: Path, engine: EmbeddedEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    later(monkeypatch, 10)
    w = watcher(policies, engine)
    await w.poll()
    target = policies / "castellan" / "gateway.rego"
    text, st = target.read_text(), target.stat()
    target.write_text(_same_size_edit(text))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -r`: the mtime as it was
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    later(monkeypatch, 20)
    await settle(w, clock)
    assert w.reloads == 1
    assert engine.policy_version == PolicyBundle.from_directory(policies).version


async def test_an_edit_within_one_timestamp_tick_is_seen(
    policies: Path, engine: EmbeddedEngine, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system whose timestamps did not move between two writes (one coarse tick): an edit of
    the same size right after a read has the stat of the version read, and is still read, because a
    read of files changed that recently is done again at the next poll."""
    tick = time.time_ns()
    monkeypatch.setattr(reload, "_stat_key", lambda st: (st.st_ino, tick, tick, st.st_size))
    w = watcher(policies, engine)
    target = policies / "castellan" / "gateway.rego"
    text = target.read_text()
    target.write_text(_same_size_edit(text))
    await settle(w, clock)
    assert w.reloads == 1
    assert engine.policy_version == PolicyBundle.from_directory(policies).version


def _same_size_edit(text: str) -> str:
    """The module with one letter of its first comment changed: another version, the same size."""
    at = text.index("# ") + 2
    edited = text[:at] + ("x" if text[at] != "x" else "y") + text[at + 1 :]
    assert len(edited.encode()) == len(text.encode())
    return edited


async def test_the_version_and_refusals_are_in_the_metrics(
    policies: Path, engine: EmbeddedEngine, clock: Clock
) -> None:
    w = watcher(policies, engine)
    data = policies / "castellan" / "config" / "data.json"
    data.write_text(data.read_text().replace('["drop table"]', '["drop table", "four"]'))
    await settle(w, clock)
    (policies / EXTRA).write_text("package castellan.gateway\n\nimport rego.v1\n\ndeny contains 42 if true\n")
    await settle(w, clock)
    registry = CollectorRegistry()
    registry.register(PolicyMetrics(engine, w))
    text = generate_latest(registry).decode()
    assert f'castellan_policy_version_info{{engine="embedded",version="{engine.policy_version}"}} 1.0' in text
    assert 'castellan_policy_reloads_total{result="loaded"} 1.0' in text
    assert 'castellan_policy_reloads_total{result="refused"} 1.0' in text
    assert "castellan_policy_edit_refused 1.0" in text


class FlakyEngine:
    """An engine that cannot be reached for its first `outages` loads, then loads anything."""

    name = "flaky"

    def __init__(self, version: str, outages: int) -> None:
        self.policy_version = version
        self.outages = outages

    async def load(self, bundle: PolicyBundle) -> LoadReport:
        if self.outages:
            self.outages -= 1
            raise BackendUnavailable("policy", "policy engine unavailable")
        self.policy_version = bundle.version
        return LoadReport(loaded=True, policy_version=bundle.version)


async def test_an_engine_that_cannot_be_reached_is_no_verdict_and_the_edit_is_tried_again(
    policies: Path, clock: Clock
) -> None:
    engine = FlakyEngine(PolicyBundle.from_directory(policies).version, outages=2)
    w = PolicyWatcher(policies, engine, quiet=1.0)  # type: ignore[arg-type]
    data = policies / "castellan" / "config" / "data.json"
    data.write_text(data.read_text().replace('["drop table"]', '["drop table", "four"]'))
    await settle(w, clock)
    assert (w.reloads, w.refusals, w.refused) == (0, 0, None)
    await w.poll()
    await w.poll()
    assert engine.policy_version == PolicyBundle.from_directory(policies).version
    assert (w.reloads, w.refusals) == (1, 0)
