"""Hot reload: a consistent snapshot of the policy directory is verified, then swapped in; an edit that
is half-written, broken, failing its tests or ill-typed is refused and the last good version decides."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from server.errors import BackendUnavailable, ConfigError
from server.policy.bundle import PolicyBundle, read_files
from server.policy.engine import LoadReport, PolicyEngine
from server.policy.verify import verify_in_process

log = structlog.get_logger("castellan.policy")

Verifier = Callable[[PolicyBundle], Awaitable[tuple[str, ...]]]


RACY_SECONDS = 2.0
"""A file changed less than this long before its content was read may change again with the same
stat (a timestamp tick of a coarse file system, a clock a little behind): such a snapshot is read
again at the next poll, until every file is older than this at the time of a read."""

Stat = tuple[int, int, int, int]
"""(inode, mtime ns, ctime ns, size) of a file or directory."""


def _stat_key(st: os.stat_result) -> Stat:
    # ctime too: no user-space call sets it, so an edit whose writer restores the mtime (`touch -r`,
    # `os.utime`, `cp -p`, `rsync -t`) still changes it.
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@dataclass(frozen=True, slots=True)
class Tree:
    """The stat of every directory under the root and of every policy file: what changes when any
    policy or data file is added, removed, replaced or edited (a name added or removed changes its
    directory's mtime and ctime)."""

    dirs: tuple[tuple[str, Stat], ...]
    files: tuple[tuple[str, Stat], ...]

    def newest_ns(self) -> int:
        return max((max(st[1], st[2]) for _, st in self.dirs + self.files), default=0)


def scan(root: Path) -> Tree | None:
    """Lists the directory tree (`os.scandir`, one listing per directory) and stats each policy file,
    the files `bundle.policy_files` names; None when the root is gone."""
    dirs: list[tuple[str, Stat]] = []
    files: list[tuple[str, Stat]] = []
    pending = [str(root)]
    while pending:
        top = pending.pop()
        try:
            dirs.append((top, _stat_key(os.stat(top))))
            with os.scandir(top) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):  # vanished since listed: the next scan sees it gone
                        if entry.is_dir(follow_symlinks=False):  # as `policy_files`: no symlinked directory
                            pending.append(entry.path)
                        elif entry.is_file() and entry.name.endswith((".rego", ".json")):
                            files.append((entry.path, _stat_key(entry.stat())))
        except OSError:
            if top == str(root):
                return None
    return Tree(tuple(sorted(dirs)), tuple(sorted(files)))


def restat(tree: Tree) -> Tree | None:
    """`tree` stated again without listing any directory (a stat each, no open, no getdents): the
    same tree while nothing changed, else a new `scan` (None when the root is gone)."""
    try:
        if all(_stat_key(os.stat(path)) == st for path, st in tree.dirs):
            return Tree(tree.dirs, tuple((path, _stat_key(os.stat(path))) for path, _ in tree.files))
    except OSError:  # a file or directory vanished: a rescan says what is there now
        pass
    return scan(Path(tree.dirs[0][0])) if tree.dirs else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every policy file's text, read while no file changed, and a hash of all of them (tests too)."""

    files: Mapping[str, str]
    digest: str
    tree: Tree | None = None
    read_at_ns: int = 0
    """Wall-clock time when the read began: a file changed within `RACY_SECONDS` of it is racy."""

    @property
    def racy(self) -> bool:
        return self.tree is None or self.tree.newest_ns() >= self.read_at_ns - int(RACY_SECONDS * 1e9)


def read_snapshot(root: Path) -> Snapshot | None:
    """The directory as it is now, or None when a file changed (or vanished) while it was being read."""
    if not root.is_dir():
        return None
    started = time.time_ns()
    before = scan(root)
    if before is None:
        return None
    try:
        files = read_files(root, (Path(path) for path, _ in before.files))
    except (OSError, ConfigError):
        return None  # mid-write (e.g. a torn UTF-8 sequence) or mid-rename: not a snapshot yet
    if scan(root) != before:
        return None
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + files[rel].encode() + b"\0")
    return Snapshot(files, digest.hexdigest(), before, started)


def current_snapshot(root: Path, last: Snapshot | None) -> Snapshot | None:
    """The directory as it is now, read again only when it may have changed since `last`: when the
    stat of a directory or file differs (inode, mtime, ctime or size), or when `last` was racy (a file
    changed within `RACY_SECONDS` of reading it). Otherwise `last` itself, from one stat per
    directory and per file and no read."""
    if last is not None and last.tree is not None and not last.racy and restat(last.tree) == last.tree:
        return last
    return read_snapshot(root)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An edit that was not swapped in, and why."""

    snapshot: str
    reasons: tuple[str, ...]
    at: float


def in_process_verifier(entrypoint: str, evaluator: str = "") -> Verifier:
    """Verification by the embedded engine's evaluator (`evaluator`: its name, default the one the
    embedded engine picks), on a worker thread."""

    async def verify(bundle: PolicyBundle) -> tuple[str, ...]:
        return await asyncio.to_thread(verify_in_process, bundle, entrypoint, evaluator)

    return verify


def verifier_for(engine: PolicyEngine, entrypoint: str) -> Verifier | None:
    """The checks to run before `engine.load`. An engine whose `load` verifies in the engine itself
    (`verifies_on_load`, as the OPA engine does, in the OPA that will serve the version) needs none;
    any other gets the in-process verification, so no engine is ever swapped unverified."""
    if getattr(engine, "verifies_on_load", False):
        return None
    return in_process_verifier(entrypoint, getattr(engine, "evaluator", ""))


class PolicyWatcher:
    """Polls `root` every `interval` seconds (portable, no inotify needed).

    A version is a snapshot: all files read with no file changing meanwhile, and the same content
    hash read again after `quiet` seconds without any change, so a file being written in several
    chunks is not loaded half-way (as long as the writer pauses for less than `quiet`). The snapshot
    is then verified (`verify`, and the engine's own `load`), and swapped in only when it passes; a
    refusal keeps the last good version deciding and is kept in `refused` (for `/readyz`, metrics
    and the log) until a later snapshot loads or the files match the version in force again. An
    engine that cannot be reached while loading (`BackendUnavailable`) is no verdict: the same
    snapshot is tried again at the next poll.
    """

    def __init__(
        self,
        root: Path,
        engine: PolicyEngine,
        interval: float = 1.0,
        on_loaded: Callable[[PolicyBundle], None] | None = None,
        *,
        quiet: float = 1.0,
        verify: Verifier | None = None,
    ) -> None:
        self._root = root
        self._engine = engine
        self._interval = interval
        self._quiet = quiet
        self._verify = verify
        self._task: asyncio.Task[None] | None = None
        self._on_loaded = on_loaded
        first = read_snapshot(root)
        self._last = first  # the latest snapshot read: the next poll reads again only if it may have changed
        self._seen = first.digest if first else ""  # the latest digest read, and since when
        self._seen_since = time.monotonic()
        self._settled = self._seen  # the latest digest acted on (loaded, refused or already in force)
        self.last_report: LoadReport | None = None
        self.refused: Refusal | None = None
        self.loaded_at = time.time()
        self.reloads = 0
        self.refusals = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except Exception as exc:  # the watcher must survive anything a file system does
                log.error("policy_reload_failed", error=repr(exc))

    async def poll(self) -> LoadReport | None:
        """Act on the directory if a new snapshot has settled; the report, or None when nothing did."""
        snapshot = await asyncio.to_thread(current_snapshot, self._root, self._last)
        self._last = snapshot
        now = time.monotonic()
        digest = snapshot.digest if snapshot else ""
        if digest != self._seen:
            self._seen, self._seen_since = digest, now
            return None
        if snapshot is None or digest == self._settled or now - self._seen_since < self._quiet:
            return None
        try:
            report = await self._apply(snapshot)
        except BackendUnavailable as exc:  # the engine could not be reached: no verdict, try again
            log.warning("policy_reload_deferred", snapshot=digest[:16], reason="; ".join(exc.reasons))
            return None
        self._settled = digest
        return report

    async def _apply(self, snapshot: Snapshot) -> LoadReport | None:
        started = time.perf_counter()
        previous = self._engine.policy_version
        try:
            bundle = PolicyBundle.from_files(self._root, snapshot.files)
        except ConfigError as exc:
            return self._refuse(snapshot, (str(exc),))
        if bundle.version == previous:
            self.refused = None  # back to the version in force (or only tests changed)
            return None
        problems = await self._verify(bundle) if self._verify is not None else ()
        if problems:
            return self._refuse(snapshot, problems)
        report = await self._engine.load(bundle)
        if not report.loaded:
            return self._refuse(snapshot, report.errors)
        if self._on_loaded is not None:
            self._on_loaded(bundle)
        self.last_report, self.refused, self.loaded_at = report, None, time.time()
        self.reloads += 1
        log.info(
            "policy_reloaded",
            policy_version=report.policy_version,
            previous_version=previous,
            snapshot=snapshot.digest[:16],
            engine=self._engine.name,
            verify_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return report

    def _refuse(self, snapshot: Snapshot, reasons: tuple[str, ...]) -> LoadReport:
        report = LoadReport(loaded=False, policy_version=self._engine.policy_version, errors=reasons)
        self.last_report, self.refused = report, Refusal(snapshot.digest[:16], reasons, time.time())
        self.refusals += 1
        log.error(
            "policy_edit_refused",
            snapshot=snapshot.digest[:16],
            errors=list(reasons),
            still_deciding=report.policy_version,
            engine=self._engine.name,
        )
        return report

    def status(self) -> dict[str, Any]:
        """The version in force and the latest refused edit, for `/readyz`."""
        status: dict[str, Any] = {
            "version": self._engine.policy_version,
            "engine": self._engine.name,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "refusals": self.refusals,
        }
        if self.refused is not None:
            status["refused_edit"] = {
                "snapshot": self.refused.snapshot,
                "reasons": list(self.refused.reasons),
                "at": self.refused.at,
            }
        return status

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class PolicyMetrics:
    """A Prometheus collector read at scrape time: the version in force (`castellan_policy_version_info`),
    reloads and refused edits, and whether the last edit was refused; with the OPA engine, its
    circuit breaker (state, openings, re-pushes)."""

    def __init__(self, engine: PolicyEngine, watcher: PolicyWatcher | None) -> None:
        self._engine = engine
        self._watcher = watcher

    def collect(self) -> Iterator[Any]:
        info = InfoMetricFamily("castellan_policy_version", "The policy version deciding calls.")
        info.add_metric([], {"version": self._engine.policy_version, "engine": self._engine.name})
        yield info
        if self._watcher is not None:
            reloads = CounterMetricFamily(
                "castellan_policy_reloads", "Policy edits verified and swapped in, or refused.", labels=["result"]
            )
            reloads.add_metric(["loaded"], self._watcher.reloads)
            reloads.add_metric(["refused"], self._watcher.refusals)
            yield reloads
            yield GaugeMetricFamily(
                "castellan_policy_edit_refused",
                "1 while the policy files on disk hold an edit that was refused (the last good version decides).",
                value=int(self._watcher.refused is not None),
            )
        circuit = getattr(self._engine, "circuit", None)
        if circuit is not None:
            yield GaugeMetricFamily(
                "castellan_policy_engine_circuit_open",
                "1 while the policy engine's circuit breaker is open or half-open (calls denied fast).",
                value=int(circuit.state != "closed"),
            )
            opens = CounterMetricFamily("castellan_policy_engine_circuit_opens", "Times the circuit breaker opened.")
            opens.add_metric([], circuit.opens)
            yield opens
            pushes = CounterMetricFamily(
                "castellan_policy_engine_repushes", "Policy re-pushes to an OPA that had lost it (restarted)."
            )
            pushes.add_metric([], getattr(self._engine, "repushes", 0))
            yield pushes
