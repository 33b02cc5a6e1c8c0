"""Work a request leaves for after its response is written (the outcome record, the decision-log line).

`later(fn)` runs `fn` once the response of the request being served has been written, when the edge
serving it says when that is (`answering`, around the request: the lean MCP paths, server/protocol/
fast.py); anywhere else on the event loop's next turn. The next turn alone is not enough on a 2025-era
session: its request runs in a task of its own (cancellable), and the loop takes that task's result
to the edge, which writes the response, only turns later. `fn` must not raise.

Queued work waits for the response at most `AT_MOST_SECONDS`: a request whose answer takes longer (a
slow tool behind the policy line it queued, a slow reader) holds nobody's record past that bound, as
the lines and outcomes of other calls that join a drain it queued wait with it. Its timer runs what
waits so far (on an idle loop: the call is still running) and later work queues afresh.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar

import structlog

log = structlog.get_logger("castellan")


AT_MOST_SECONDS = 0.005
"""The longest work queued for after a response waits for it (the decision log promises its lines
within as long: server/policy/decision_log.py LATER_SECONDS)."""


class _After:
    __slots__ = ("done", "timer", "work")

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def run(self) -> None:
        """Run what waits (in order); each failure is logged, the rest still runs."""
        work, self.work = self.work, []
        for fn in work:
            try:
                fn()
            except Exception:
                log.exception("after_response_failed")

    def due(self) -> None:  # the bound passed before the response was written
        self.timer = None
        self.run()


_ANSWERING: ContextVar[_After | None] = ContextVar("castellan_after_response", default=None)


def later(fn: Callable[[], None]) -> None:
    """Run `fn` after the current request's response is written (see the module), else next turn."""
    if not queue(fn):  # no edge says when (or it has answered already): the next turn
        asyncio.get_running_loop().call_soon(fn)


def queue(fn: Callable[[], None]) -> bool:
    """Queue `fn` for after the current request's response, when an edge says when that is; else
    queue nothing and return False (the caller decides when, then)."""
    after = _ANSWERING.get()
    if after is None or after.done:
        return False
    after.work.append(fn)
    if after.timer is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a worker thread of the request's (its context copied): the response runs it
            return True
        after.timer = loop.call_later(AT_MOST_SECONDS, after.due)
    return True


class answering:  # a context manager, named like contextlib's
    """Around serving one request, up to and including writing its response: what `later` is given
    meanwhile (also by tasks the request starts) runs as this exits, once the response is out."""

    __slots__ = ("_after", "_token")

    def __enter__(self) -> None:
        self._after = after = _After()
        self._token = _ANSWERING.set(after)

    def __exit__(self, *exc: object) -> None:
        _ANSWERING.reset(self._token)
        after = self._after
        after.done = True  # a task of the request that outlives it schedules its own
        if after.timer is not None:
            after.timer.cancel()  # a cancelled timer wakes no idle loop: dropped, never waited for
            after.timer = None
        after.run()
