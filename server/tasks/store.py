"""The tasks a gateway process holds: each bound to the identity that started it, kept for a bounded time.

A task is the running call itself (its pipeline runs in this process), so the embedded store is memory:
a restart ends every task, and a caller polling one after the restart is told it is unknown. The
`TaskStore` interface is what a shared store would implement; the running work would then have to move
with it, which is why there is no SQLite or Redis store yet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

Status = Literal["working", "input_required", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class TaskLimit(Exception):
    """The store holds as many tasks as it may (in all, or for this identity)."""


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Task:
    """One task. `owner` is the identity that started it (issuer, subject and agent): nobody else
    sees it. `result` is the tool result once `completed`; `error` the JSON-RPC error once `failed`;
    `input_requests` what the call waits for while `input_required`."""

    task_id: str
    owner: str
    tool: str
    ttl_seconds: float
    poll_interval_ms: int
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    status: Status = "working"
    status_message: str | None = None
    call_id: str | None = None
    result: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None
    input_requests: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        return self.created_at + self.ttl_seconds

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def moved(self, status: Status, **changes: Any) -> Task:
        """This task in `status` (a terminal task stays as it ended)."""
        if self.terminal:
            return self
        return replace(self, status=status, updated_at=time.time(), **changes)

    def envelope(self) -> dict[str, Any]:
        """The task's wire fields (SEP-2663 `Task`): what a `CreateTaskResult` carries."""
        body: dict[str, Any] = {
            "taskId": self.task_id,
            "status": self.status,
            "createdAt": _iso(self.created_at),
            "lastUpdatedAt": _iso(self.updated_at or self.created_at),
            "ttlMs": max(1, int(self.ttl_seconds * 1000)),
            "pollIntervalMs": self.poll_interval_ms,
        }
        if self.status_message:
            body["statusMessage"] = self.status_message
        return body

    def detailed(self) -> dict[str, Any]:
        """What `tasks/get` answers (SEP-2663 `DetailedTask`): the result or error inlined once
        terminal, the pending requests while it waits for input."""
        body = self.envelope()
        if self.status == "completed" and self.result is not None:
            body["result"] = dict(self.result)
        elif self.status == "failed" and self.error is not None:
            body["error"] = dict(self.error)
        elif self.status == "input_required" and self.input_requests:
            body["inputRequests"] = {k: dict(v) for k, v in self.input_requests.items()}
        return body


class TaskStore(Protocol):
    """Where tasks are kept. `get` answers None alike for a task that does not exist, has expired,
    or belongs to another identity, so a caller cannot learn of tasks that are not its own. `add`
    raises `TaskLimit` when the store is full (in all, or for the task's owner)."""

    def add(self, task: Task) -> None: ...

    def put(self, task: Task) -> None: ...

    def get(self, task_id: str, owner: str) -> Task | None: ...

    def drop(self, task_id: str) -> None: ...

    def expired(self, now: float) -> list[Task]: ...

    def __len__(self) -> int: ...


class MemoryTaskStore:
    """The embedded store: this process's tasks, in memory, bounded in count and lifetime."""

    def __init__(self, max_tasks: int, max_per_owner: int) -> None:
        self._max = max_tasks
        self._max_per_owner = max_per_owner
        self._tasks: dict[str, Task] = {}

    def add(self, task: Task) -> None:
        self.expired(time.time())
        if len(self._tasks) >= self._max:
            raise TaskLimit(f"the gateway holds its maximum of {self._max} tasks")
        if sum(1 for t in self._tasks.values() if t.owner == task.owner) >= self._max_per_owner:
            raise TaskLimit(f"this identity holds its maximum of {self._max_per_owner} tasks")
        self._tasks[task.task_id] = task

    def put(self, task: Task) -> None:
        if task.task_id in self._tasks:
            self._tasks[task.task_id] = task

    def get(self, task_id: str, owner: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.owner != owner or task.expires_at <= time.time():
            return None
        return task

    def drop(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)

    def expired(self, now: float) -> list[Task]:
        """The tasks past their lifetime, removed from the store."""
        gone = [t for t in self._tasks.values() if t.expires_at <= now]
        self._remove(gone)
        return gone

    def _remove(self, tasks: list[Task]) -> None:
        for task in tasks:
            self._tasks.pop(task.task_id, None)

    def __len__(self) -> int:
        return len(self._tasks)
