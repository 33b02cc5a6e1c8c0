"""Hot reload: a change under the policy directory is validated, then swapped in; a broken edit is refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import structlog

from server.errors import ConfigError
from server.policy.bundle import PolicyBundle
from server.policy.engine import LoadReport, PolicyEngine

log = structlog.get_logger("castellan.policy")


def fingerprint(root: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when any policy or data file is added, removed or edited."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".rego", ".json")]
    return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


class PolicyWatcher:
    """Polls `root` every `interval` seconds (portable, no inotify needed). On a change it reads the
    bundle and asks the engine to load it; a refused bundle is logged with its errors and the last
    good policy keeps deciding. `last_report` says what happened last."""

    def __init__(
        self,
        root: Path,
        engine: PolicyEngine,
        interval: float = 1.0,
        on_loaded: Callable[[PolicyBundle], None] | None = None,
    ) -> None:
        self._root = root
        self._engine = engine
        self._interval = interval
        self._seen = fingerprint(root) if root.is_dir() else ()
        self._task: asyncio.Task[None] | None = None
        self._on_loaded = on_loaded
        self.last_report: LoadReport | None = None

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
        """Reload if anything changed; returns the report, or None when nothing changed."""
        current = fingerprint(self._root) if self._root.is_dir() else ()
        if current == self._seen:
            return None
        self._seen = current
        try:
            bundle = PolicyBundle.from_directory(self._root)
        except ConfigError as exc:
            report = LoadReport(loaded=False, policy_version=self._engine.policy_version, errors=(str(exc),))
        else:
            report = await self._engine.load(bundle)
            if report.loaded and self._on_loaded is not None:
                self._on_loaded(bundle)
        self.last_report = report
        if report.loaded:
            log.info("policy_reloaded", policy_version=report.policy_version, engine=self._engine.name)
        else:
            log.error("policy_edit_refused", errors=list(report.errors), still_deciding=report.policy_version)
        return report

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
