"""The embedded task store: a task is its owner's alone, lives at most its TTL, and the store is bounded."""

from __future__ import annotations

import time

import pytest

from server.tasks.store import MemoryTaskStore, Task, TaskLimit


def make_task(task_id: str = "t1", owner: str = "alice", ttl: float = 60.0, **overrides: object) -> Task:
    return Task(task_id=task_id, owner=owner, tool="slow", ttl_seconds=ttl, poll_interval_ms=500, **overrides)  # type: ignore[arg-type]


def test_only_the_owner_finds_a_task_and_others_are_told_it_does_not_exist() -> None:
    store = MemoryTaskStore(10, 10)
    store.add(make_task(owner="alice"))
    assert store.get("t1", "alice") is not None
    assert store.get("t1", "mallory") is None
    assert store.get("t1", "mallory") == store.get("no-such-task", "mallory")  # the same answer


def test_a_task_is_gone_once_its_ttl_has_passed() -> None:
    store = MemoryTaskStore(10, 10)
    store.add(make_task(ttl=60.0, created_at=time.time() - 61))
    assert store.get("t1", "alice") is None
    assert [t.task_id for t in store.expired(time.time())] == ["t1"]
    assert len(store) == 0


def test_a_live_task_is_kept_for_its_whole_ttl() -> None:
    store = MemoryTaskStore(10, 10)
    store.add(make_task(ttl=60.0, created_at=time.time() - 59))
    assert store.get("t1", "alice") is not None
    assert store.expired(time.time()) == []


def test_the_store_refuses_tasks_past_its_bounds_in_all_and_per_identity() -> None:
    store = MemoryTaskStore(max_tasks=3, max_per_owner=2)
    store.add(make_task("a", owner="alice"))
    store.add(make_task("b", owner="alice"))
    with pytest.raises(TaskLimit, match="this identity"):
        store.add(make_task("c", owner="alice"))
    store.add(make_task("c", owner="bob"))
    with pytest.raises(TaskLimit, match="maximum of 3"):
        store.add(make_task("d", owner="carol"))


def test_an_expired_task_frees_its_place() -> None:
    store = MemoryTaskStore(max_tasks=1, max_per_owner=1)
    store.add(make_task("old", created_at=time.time() - 100, ttl=1.0))
    store.add(make_task("new"))
    assert store.get("new", "alice") is not None


def test_a_finished_task_stays_as_it_ended() -> None:
    task = make_task().moved("completed", result={"content": []})
    assert task.moved("cancelled").status == "completed"
    assert task.detailed()["result"] == {"content": []}


def test_the_wire_shapes_carry_integer_milliseconds_and_no_v1_keys() -> None:
    task = make_task(ttl=1.5)
    envelope = task.envelope()
    assert envelope["ttlMs"] == 1500
    assert isinstance(envelope["pollIntervalMs"], int)
    assert not {"ttl", "pollInterval", "requestState", "result", "error"} & envelope.keys()
    waiting = task.moved("input_required", input_requests={"k": {"method": "elicitation/create"}})
    assert waiting.detailed()["inputRequests"] == {"k": {"method": "elicitation/create"}}
    failed = task.moved("failed", error={"code": -32603, "message": "boom"})
    assert "result" not in failed.detailed()
    assert failed.detailed()["error"]["code"] == -32603
