"""Limits as the meters apply them: which limits an identity has, the windows, and how a denial reads."""

from __future__ import annotations

from calendar import monthrange
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from server.errors import Denied
from server.identity import Identity
from server.settings import LimitOverrides, Limits, MeterSettings

Window = Literal["minute", "hour", "day", "month"]
CALL_WINDOWS: tuple[Window, ...] = ("minute", "hour", "day")
TOKEN_WINDOWS: tuple[Window, ...] = ("minute", "hour", "day", "month")


def resolve_limits(settings: MeterSettings, identity: Identity) -> Limits:
    """Defaults, then the identity's groups (where several set a limit the largest wins, 0 meaning
    unlimited), then the agent's own overrides: the most specific wins."""
    values = settings.limits.model_dump()
    from_groups: dict[str, int] = {}
    for group in identity.groups:
        overrides = settings.groups.get(group)
        if overrides is None:
            continue
        for name, value in overrides.model_dump(exclude_none=True).items():
            current = from_groups.get(name)
            if current is None or (current != 0 and (value == 0 or value > current)):
                from_groups[name] = value
    values.update(from_groups)
    agent = settings.agents.get(identity.agent_id, LimitOverrides())
    values.update(agent.model_dump(exclude_none=True))
    return Limits(**values)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One fixed window: its name, which one (`bucket` changes when it rolls over), and when it ends."""

    window: Window
    bucket: int
    ends_at: float

    def retry_after(self, now: float) -> int:
        return max(1, int(self.ends_at - now + 0.999))


_SPANS: dict[Window, int] = {"minute": 60, "hour": 3600, "day": 86400}
_current: dict[Window, Bucket] = {}  # the latest bucket of each window: every call of a second asks again


def bucket(window: Window, now: float) -> Bucket:
    """The fixed window `now` falls in (UTC; months by the calendar)."""
    found = _current.get(window)
    if found is not None and found.bucket <= now < found.ends_at:
        return found
    span = _SPANS.get(window)
    if span is not None:
        start = int(now // span) * span
        found = Bucket(window, start, start + span)
    else:
        t = datetime.fromtimestamp(now, UTC)
        first = datetime(t.year, t.month, 1, tzinfo=UTC).timestamp()
        found = Bucket(window, int(first), first + monthrange(t.year, t.month)[1] * 86400)
    _current[window] = found
    return found


def call_limit(limits: Limits, window: Window) -> int:
    return int(getattr(limits, f"calls_per_{window}", 0))


def token_limit(limits: Limits, window: Window) -> int:
    return int(getattr(limits, f"tokens_per_{window}"))


# Denials: the same words from every meter backend, each naming the limit, its window, the usage and
# when it resets, so an agent (and its operator) can act on it instead of retrying blindly.


def rate_denied(window: Window, used: int, maximum: int, retry_after: int) -> Denied:
    return Denied("admit", f"rate limit: {used} of {maximum} calls per {window} used (retry_after={retry_after}s)")


def budget_denied(window: Window, used: int, reserved: int, want: int, maximum: int, retry_after: int) -> Denied:
    return Denied(
        "admit",
        f"token budget: {used} of {maximum} tokens per {window} used, {reserved} reserved by calls in flight, "
        f"this call needs {want} (retry_after={retry_after}s)",
    )


def concurrency_denied(in_flight: int, maximum: int) -> Denied:
    return Denied("admit", f"concurrency limit: {in_flight} of {maximum} calls in flight (retry_after=1s)")


def run_denied(run_id: str, maximum: int) -> Denied:
    return Denied("admit", f"loop depth: run {run_id} reached the maximum of {maximum} tool calls")


def repeat_denied(run_id: str, repeats: int, maximum: int) -> Denied:
    return Denied(
        "admit", f"loop detected: the same tool and arguments {repeats} times in run {run_id} (max {maximum})"
    )


def depth_denied(depth: int, maximum: int) -> Denied:
    return Denied("admit", f"nesting depth: run depth {depth} exceeds the maximum of {maximum}")


def identical_denied(count: int, maximum: int, window: int, retry_after: int) -> Denied:
    return Denied(
        "admit",
        f"loop detected: the same tool and arguments {count} times in the last {window}s by this identity "
        f"(max {maximum}, whatever the run; retry_after={retry_after}s)",
    )


def tool_rate_denied(tool: str, used: int, maximum: int, window: int, retry_after: int) -> Denied:
    return Denied(
        "admit",
        f"tool rate limit: {used} of {maximum} calls of {tool} in the last {window}s used (retry_after={retry_after}s)",
    )


def sliding_retry_after(oldest: float, window: int, now: float) -> int:
    """Seconds until the oldest call in a sliding window leaves it."""
    return max(1, int(oldest + window - now + 0.999))
