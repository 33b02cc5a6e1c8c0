"""Admission against every limit, over any store of counters: one copy of the rules for each backend
that keeps its own counts (the SQLite meter's statements, the buffered meter's memory)."""

from __future__ import annotations

from typing import Protocol

from server.call import Budget, RunInfo
from server.metering import limits as L
from server.metering.meter import Admission


class Store(Protocol):
    """What an admission reads and writes. Reads first, writes last: a denial writes nothing."""

    def get(self, key: str, window: int) -> int: ...

    def put(self, key: str, window: int, value: int) -> None: ...

    def in_flight(self, agent: str, now: float) -> tuple[int, int]:
        """(reservations held, tokens they hold) by `agent`, expired ones dropped."""
        ...

    def window(self, agent: str, key: str, window: int, now: float) -> tuple[int, float]:
        """Calls of `key` by `agent` in the last `window` seconds, and when the oldest of them was."""
        ...

    def log_calls(self, rows: list[tuple[str, str, float]]) -> None: ...

    def reserve(self, reservation: str, agent: str, tokens: int, expires_at: float, instance: str) -> None: ...


def admit_in(c: Store, agent: str, run: RunInfo, a: Admission, now: float, instance: str = "") -> Budget:
    """Every limit checked, then everything counted: a denial is raised before anything is written."""
    limits = a.limits
    in_flight, reserved = c.in_flight(agent, now)
    calls: dict[L.Window, tuple[L.Bucket, int]] = {}
    for window in L.CALL_WINDOWS:
        b = L.bucket(window, now)
        used = c.get(f"calls:{agent}:{window}", b.bucket)
        calls[window] = (b, used)
        maximum = L.call_limit(limits, window)
        if maximum and used + 1 > maximum:
            raise L.rate_denied(window, used, maximum, b.retry_after(now))
    if limits.concurrent_calls and in_flight + 1 > limits.concurrent_calls:
        raise L.concurrency_denied(in_flight, limits.concurrent_calls)
    day_tokens = 0
    for window in L.TOKEN_WINDOWS:
        b = L.bucket(window, now)
        used = c.get(f"tokens:{agent}:{window}", b.bucket)
        day_tokens = used if window == "day" else day_tokens
        maximum = L.token_limit(limits, window)
        if maximum and used + reserved + a.estimate > maximum:
            raise L.budget_denied(window, used, reserved, a.estimate, maximum, b.retry_after(now))
    if limits.max_depth and run.depth > limits.max_depth:
        raise L.depth_denied(run.depth, limits.max_depth)
    run_calls = c.get(f"run:{agent}:{run.run_id}", 0) + 1
    if limits.max_run_calls and run_calls > limits.max_run_calls:
        raise L.run_denied(run.run_id, limits.max_run_calls)
    repeats = c.get(f"repeat:{agent}:{run.run_id}:{a.call_key}", 0) + 1
    if limits.max_repeats and repeats > limits.max_repeats:
        raise L.repeat_denied(run.run_id, repeats, limits.max_repeats)
    # Sliding windows are kept only while their limit is on: each key then holds at most `limit`
    # rows (refused calls are not logged), so counting stays cheap.
    same_key, tool_key = f"same:{a.call_key}", f"tool:{a.tool}"
    logged: list[tuple[str, str, float]] = []
    identical = tool_calls = 0
    if limits.max_identical_calls:
        span = limits.identical_calls_window_seconds
        identical, oldest = c.window(agent, same_key, span, now)
        identical += 1
        if identical > limits.max_identical_calls:
            raise L.identical_denied(
                identical, limits.max_identical_calls, span, L.sliding_retry_after(oldest, span, now)
            )
        logged.append((agent, same_key, now))
    if limits.max_calls_per_tool:
        span = limits.tool_calls_window_seconds
        tool_calls, oldest = c.window(agent, tool_key, span, now)
        if tool_calls + 1 > limits.max_calls_per_tool:
            retry = L.sliding_retry_after(oldest, span, now)
            raise L.tool_rate_denied(a.tool, tool_calls, limits.max_calls_per_tool, span, retry)
        tool_calls += 1
        logged.append((agent, tool_key, now))
    if logged:
        c.log_calls(logged)
    for window, (b, used) in calls.items():
        c.put(f"calls:{agent}:{window}", b.bucket, used + 1)
    c.put(f"run:{agent}:{run.run_id}", 0, run_calls)
    c.put(f"repeat:{agent}:{run.run_id}:{a.call_key}", 0, repeats)
    c.reserve(a.reservation, agent, a.estimate, now + a.ttl, instance)
    return Budget(
        tokens_used=day_tokens,
        tokens_limit=limits.tokens_per_day,
        calls_this_minute=calls["minute"][1] + 1,
        run_calls=run_calls,
        repeats=repeats,
        reservation=a.reservation,
        reserved_tokens=a.estimate,
        identical_calls=identical,
        tool_calls=tool_calls,
        identical_calls_limit=limits.max_identical_calls,
        identical_calls_window_seconds=limits.identical_calls_window_seconds,
        tool_calls_limit=limits.max_calls_per_tool,
        tool_calls_window_seconds=limits.tool_calls_window_seconds,
    )
