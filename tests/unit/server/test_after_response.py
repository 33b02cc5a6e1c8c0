"""`after_response.later`: work for after the current request's response, when an edge says when
(`answering`, also for tasks the request starts), else the loop's next turn; never lost, and never
held past `AT_MOST_SECONDS` by a request whose answer takes longer."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from server.after_response import AT_MOST_SECONDS, answering, later

pytestmark = pytest.mark.anyio


async def test_without_an_edge_the_work_runs_on_the_next_turn() -> None:
    ran: list[str] = []
    later(lambda: ran.append("work"))
    assert ran == []
    await asyncio.sleep(0)
    assert ran == ["work"]


async def test_inside_answering_the_work_runs_as_it_ends_also_from_a_task_of_the_request() -> None:
    ran: list[str] = []

    async def handler() -> None:
        later(lambda: ran.append("from the task"))

    with answering():
        later(lambda: ran.append("from the request"))
        await asyncio.ensure_future(handler())  # the request's own task, as a 2025 session runs it
        for _ in range(5):
            await asyncio.sleep(0)  # turns pass: nothing runs before the response is written
        assert ran == []
        ran.append("response")
    assert ran == ["response", "from the request", "from the task"]


async def test_a_task_that_outlives_its_request_runs_its_work_on_the_next_turn() -> None:
    ran: list[str] = []
    gate = asyncio.Event()

    async def handler() -> None:
        await gate.wait()
        later(lambda: ran.append("late"))

    with answering():
        task = asyncio.ensure_future(handler())
    assert ran == []
    gate.set()
    await task
    await asyncio.sleep(0)
    assert ran == ["late"]  # not lost with the request's list, already run


async def test_work_that_fails_is_logged_and_the_rest_still_runs() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    with capture_logs() as logged, answering():
        later(broken)
        later(lambda: ran.append("after"))
    assert ran == ["after"]
    assert [e["event"] for e in logged] == ["after_response_failed"]


async def test_a_request_whose_answer_takes_long_holds_the_work_no_longer_than_the_bound() -> None:
    ran: list[str] = []
    with answering():  # e.g. a slow tool runs after the call queued its policy line
        later(lambda: ran.append("queued early"))
        await asyncio.sleep(AT_MOST_SECONDS * 4)
        assert ran == ["queued early"]  # run while the request still waits, not when it ends
        later(lambda: ran.append("queued after"))  # queues afresh, for the response or the bound
        ran.append("response")
    assert ran == ["queued early", "response", "queued after"]
    await asyncio.sleep(AT_MOST_SECONDS * 4)
    assert ran == ["queued early", "response", "queued after"]  # the cancelled bound runs nothing twice


async def test_a_worker_thread_of_the_request_queues_for_its_response() -> None:
    ran: list[str] = []
    with answering():
        await asyncio.to_thread(later, lambda: ran.append("from the thread"))  # the request's context, copied
        assert ran == []
        ran.append("response")
    assert ran == ["response", "from the thread"]
