"""The sandbox: which mode a host gives, what a bubblewrap sandbox is made of, and that it holds."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import ConfigError
from server.sandbox import Limits, Profile, SandboxMode, Worker, WorkerDied, detect_mode, mode, seccomp
from server.sandbox.launch import bwrap_argv
from server.settings import Settings

pytestmark = pytest.mark.anyio
BWRAP = SandboxMode("bubblewrap", "test", bwrap="/usr/bin/bwrap", seccomp=True)
needs_bwrap = pytest.mark.skipif(not detect_mode("auto").isolated, reason=detect_mode("auto").reason)


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(mode.shutil, "which", lambda _name: None)
    detect_mode.cache_clear()
    yield
    detect_mode.cache_clear()


@pytest.mark.usefixtures("no_bwrap")
def test_without_bubblewrap_auto_falls_back_and_says_why() -> None:
    found = detect_mode("auto")
    assert not found.isolated
    assert "bubblewrap (bwrap) is not installed" in found.describe()
    with pytest.raises(ConfigError, match=r"tools\.sandbox = 'bubblewrap'"):
        detect_mode("bubblewrap")


@pytest.mark.usefixtures("no_bwrap")
def test_production_refuses_a_silent_fallback(tmp_path: Path) -> None:
    from tools.catalog_tools import sandbox_mode

    production = Settings(environment="production", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="without namespaces"):
        sandbox_mode(production)
    accepted = Settings(environment="production", data_dir=tmp_path, tools={"sandbox": "rlimits"})
    assert sandbox_mode(accepted).name == "rlimits"


def test_a_sandbox_binds_only_the_runtime_and_what_its_profile_lists(tmp_path: Path) -> None:
    data = tmp_path / "data"
    profile = Profile(read_only=(tmp_path / "code",), writable=(tmp_path / "spill",))
    argv = bwrap_argv(BWRAP, profile, ["python", "-c", "pass"], seccomp_fd=7)
    assert argv[:2] == ["/usr/bin/bwrap", "--unshare-all"]
    for flag in ("--die-with-parent", "--new-session", "--unshare-user"):
        assert flag in argv
    assert "--share-net" not in argv
    assert argv[argv.index("--seccomp") + 1] == "7"
    bound = {argv[i + 1] for i, a in enumerate(argv) if a in ("--ro-bind", "--bind", "--ro-bind-try")}
    assert str(tmp_path / "code") in bound
    assert argv[argv.index("--bind") + 1] == str(tmp_path / "spill")
    assert not any(str(data) in b for b in bound)
    assert argv[-4:] == ["--", "python", "-c", "pass"]


@needs_bwrap
async def test_a_sandboxed_process_cannot_fork_see_the_host_or_the_network(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    script = (
        "import json, os, socket, sys\n"
        "out = {}\n"
        "try:\n    os.fork(); out['fork'] = 'ok'\nexcept OSError as e:\n    out['fork'] = e.errno\n"
        f"out['secret'] = os.path.exists({str(secret)!r})\n"
        "out['uid'] = os.getuid()\n"
        "s = socket.socket()\n"
        "try:\n    s.connect(('1.1.1.1', 53)); out['net'] = 'ok'\nexcept OSError as e:\n    out['net'] = e.errno\n"
        "print(json.dumps({'ready': True}), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(json.dumps(out), flush=True)\n"
    )
    profile = Profile(limits=Limits(memory_bytes=256 << 20, processes=1))
    worker = await Worker.start(detect_mode("auto"), profile, [sys.executable, "-I", "-c", script])
    try:
        seen = await worker.request({"op": "report"}, 30)
    finally:
        await worker.kill()
    assert seen == {"fork": 1, "secret": False, "uid": 65534, "net": 101}  # EPERM, absent, nobody, ENETUNREACH


async def test_a_worker_that_dies_at_start_says_so() -> None:
    with pytest.raises(WorkerDied, match="did not start"):
        await Worker.start(detect_mode("auto"), Profile(), [sys.executable, "-I", "-c", "raise SystemExit(3)"])


@pytest.mark.skipif(bool(seccomp.unavailable()), reason="libseccomp unavailable")
async def test_the_weaker_mode_still_refuses_processes_and_network(tmp_path: Path) -> None:
    script = (
        "import json, os, socket, sys\n"
        "out = {}\n"
        "try:\n    os.fork(); out['fork'] = 'ok'\nexcept OSError as e:\n    out['fork'] = e.errno\n"
        "try:\n    socket.socket(); out['net'] = 'ok'\nexcept OSError as e:\n    out['net'] = e.errno\n"
        "out['env'] = sorted(os.environ)\n"
        "print(json.dumps({'ready': True}), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(json.dumps(out), flush=True)\n"
    )
    profile = Profile(env={"GRANTED": "1"}, limits=Limits(memory_bytes=256 << 20, processes=1))
    worker = await Worker.start(detect_mode("rlimits"), profile, [sys.executable, "-I", "-c", script])
    try:
        seen = await worker.request({"op": "report"}, 30)
    finally:
        await worker.kill()
    assert seen["fork"] == 1  # EPERM
    assert seen["net"] == 13  # EACCES
    assert set(seen["env"]) <= {"GRANTED", "LC_CTYPE"}


async def test_a_process_limit_above_one_caps_the_sandbox_and_its_group_goes_with_it() -> None:
    from server.sandbox import cgroup

    probe = cgroup.pids_group(4)
    if probe is None:
        pytest.skip("no writable pids cgroup here")
    cgroup.remove(probe)
    script = (
        "import json, os, sys, time\n"
        "forked = 0\n"
        "for _ in range(30):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    forked += 1\n"
        "print(json.dumps({'ready': True}), flush=True)\n"
        "sys.stdin.readline()\n"
        "print(json.dumps({'forked': forked}), flush=True)\n"
    )
    worker = await Worker.start(
        detect_mode("auto"), Profile(limits=Limits(processes=8)), [sys.executable, "-c", script]
    )
    group = worker._launched.group
    assert group is not None
    try:
        seen = await worker.request({}, 30)
    finally:
        await worker.kill()
    assert 0 < seen["forked"] < 8  # the cgroup's pids.max, counting bubblewrap and the sandbox's init
    assert not group.exists()  # removed, its sleeping children killed with it


def test_a_data_dir_inside_the_runtime_sandboxes_see_is_refused(tmp_path: Path) -> None:
    from tools.catalog_tools import sandbox_mode

    inside = Path(sys.prefix) / "castellan-data"
    with pytest.raises(ConfigError, match="tool sandboxes can read"):
        sandbox_mode(Settings(data_dir=inside))
    assert sandbox_mode(Settings(data_dir=tmp_path)).name in ("bubblewrap", "rlimits")
