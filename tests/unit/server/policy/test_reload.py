"""Hot reload: only a settled, complete snapshot is verified and swapped in; a refusal keeps the last
good version deciding and is reported until the files match a deciding version again."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.errors import BackendUnavailable
from server.policy import reload
from server.policy.bundle import PolicyBundle
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
    monkeypatch.setattr(reload.time, "monotonic", fake)
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
    reads = iter([(("a", 1, 1, 1),), (("a", 1, 2, 2),)])
    monkeypatch.setattr(reload, "fingerprint", lambda root: next(reads))
    assert read_snapshot(policies) is None


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
