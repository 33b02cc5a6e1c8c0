"""The charts' data, from the console's index (and the meter, for budgets): each chart is a small
document the page hands to Chart.js and also shows as a table (the accessible reading of it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.console.index import GRAINS, SHADOW_CHANGES, SLOT, ConsoleIndex
from server.errors import BackendUnavailable
from server.identity import Identity
from server.metering.limits import resolve_limits
from server.metering.meter import Meter
from server.settings import MeterSettings

WINDOWS = {"24h": 24 * 3600, "7d": 7 * 86_400, "30d": 30 * 86_400}
TOP = 8
PALETTE = ["#0b5cad", "#b42318", "#1a7f37", "#8250df", "#bf8700", "#0f766e", "#c2410c", "#57606a", "#a21caf"]


@dataclass
class Chart:
    """`kind` bar or line; `labels` along the x axis; `series` of (name, values); `stacked`, `horizontal`."""

    id: str
    title: str
    kind: str
    labels: list[str]
    series: list[tuple[str, list[float]]]
    stacked: bool = False
    horizontal: bool = False
    note: str = ""
    table_head: list[str] = field(default_factory=list)
    table: list[list[Any]] = field(default_factory=list)
    empty: str = "No calls in this window."
    """What the page says instead of the chart when there is nothing to draw."""
    summary_head: list[str] = field(default_factory=list)
    summary: list[list[Any]] = field(default_factory=list)
    """A second table shown beside the chart (the chart's own numbers stay in `rows`)."""
    summary_caption: str = ""

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "labels": self.labels,
            "series": [{"name": n, "values": v, "color": PALETTE[i % len(PALETTE)]} for i, (n, v) in
                       enumerate(self.series)],
            "stacked": self.stacked,
            "horizontal": self.horizontal,
            "title": self.title,
        }  # fmt: skip

    def rows(self) -> list[list[Any]]:
        """The chart as a table: one row per label (unless a table of its own was given)."""
        if self.table:
            return self.table
        return [[label, *(values[i] for _, values in self.series)] for i, label in enumerate(self.labels)]

    def head(self) -> list[str]:
        return self.table_head or ["", *(name for name, _ in self.series)]


def _first_hour(window: str, now: float | None) -> int:
    return int(((now or time.time()) - WINDOWS[window]) // 3600)


# Per window: the summary grain and how many of its steps make one bar.
_STEPS = {"24h": ("15m", 2), "7d": ("1h", 4), "30d": ("1h", 24)}


async def over_time(index: ConsoleIndex, window: str, now: float | None = None) -> list[Chart]:
    """Calls by tool and denials by stage, per bar of the window (from the summaries: 30-minute bars
    over 24 hours, 4-hour bars over 7 days, days over 30 days), the last bar holding the current step."""
    grain, per_bar = _STEPS[window]
    seconds = GRAINS[grain]
    bars = WINDOWS[window] // (seconds * per_bar)
    last = int((now or time.time()) // seconds) + 1
    first = last - bars * per_bar
    tools = await index.aggregate(
        f"SELECT (t - ?) / ?, CASE tool WHEN '' THEN '?' ELSE tool END, SUM(n) FROM tool_{grain}"
        " WHERE t >= ? AND t < ? GROUP BY 1, 2 HAVING SUM(n) != 0",
        (first, per_bar, first, last),
    )
    stages = await index.aggregate(
        f"SELECT (t - ?) / ?, stage, SUM(n) FROM denial_{grain} WHERE t >= ? AND t < ? GROUP BY 1, 2"
        " HAVING SUM(n) != 0",
        (first, per_bar, first, last),
    )
    totals: dict[str, int] = {}
    for _, tool, count in tools:
        totals[tool] = totals.get(tool, 0) + count
    top = sorted(totals, key=lambda t: (-totals[t], t))[:TOP]
    by_tool: dict[str, list[float]] = {}
    for bar, tool, count in tools:
        by_tool.setdefault(tool if tool in top else "other tools", [0] * bars)[bar] += count
    by_stage: dict[str, list[float]] = {}
    for bar, stage, count in stages:
        by_stage.setdefault(stage or "?", [0] * bars)[bar] += count
    fmt = "%H:%M" if window == "24h" else "%m-%d %H:%M" if window == "7d" else "%m-%d"
    labels = [datetime.fromtimestamp((first + i * per_bar) * seconds, UTC).strftime(fmt) for i in range(bars)]
    order = [t for t in top if t in by_tool] + (["other tools"] if "other tools" in by_tool else [])
    return [
        Chart("calls-by-tool", "Calls over time, by tool", "bar", labels, [(t, by_tool[t]) for t in order],
              stacked=True),
        Chart("denials-by-stage", "Denials over time, by the stage that refused", "bar", labels,
              [(s, by_stage[s]) for s in sorted(by_stage)], stacked=True),
    ]  # fmt: skip


async def denial_reasons(index: ConsoleIndex, window: str, now: float | None = None) -> Chart:
    rows = await index.aggregate(
        "SELECT reason, SUM(n) FROM hour_reason WHERE hour >= ? GROUP BY 1 HAVING SUM(n) > 0"
        " ORDER BY 2 DESC, 1 LIMIT 10",
        (_first_hour(window, now),),
    )
    return Chart("denial-reasons", "Top denial reasons", "bar", [str(r[0])[:80] for r in rows],
                 [("denials", [r[1] for r in rows])], horizontal=True)  # fmt: skip


async def token_spend(
    index: ConsoleIndex, meter: Meter, metering: MeterSettings, window: str, now: float | None = None
) -> Chart:
    """The agents that spent most in the window: their spend today (the meter's day window) against
    their daily budget (limits resolved as for the groups of their latest call)."""
    rows = await index.aggregate(
        "SELECT agent, SUM(tokens), MAX(last_seq) FROM hour_agent WHERE hour >= ? GROUP BY agent"
        " HAVING SUM(calls) > 0 ORDER BY 2 DESC, 1 LIMIT 12",
        (_first_hour(window, now),),
    )
    agents: list[str] = []
    used: list[float] = []
    budget: list[float] = []
    table: list[list[Any]] = []
    note = ""
    for agent, spent, last_seq in rows:
        groups = await index.aggregate("SELECT grp FROM call_groups WHERE seq = ?", (last_seq,))
        identity = Identity(agent_id=str(agent), subject=str(agent), issuer="", groups=tuple(g[0] for g in groups))
        limits = resolve_limits(metering, identity)
        try:
            usage = await meter.usage(str(agent), limits)
        except BackendUnavailable as exc:
            note = f"The meter cannot answer ({'; '.join(exc.reasons)}): spend shown from the audit log only."
            usage = None
        day = next((w for w in usage.tokens if w.window == "day"), None) if usage else None
        today = day.used if day else 0
        limit = day.limit if day else limits.tokens_per_day
        agents.append(str(agent))
        used.append(today)
        budget.append(limit or 0)
        table.append([agent, spent, today, limit or "unlimited", f"{today / limit:.0%}" if limit else ""])
    return Chart(
        "token-spend", "Token spend per agent today, against its daily budget", "bar", agents,
        [("used today", used), ("daily budget", budget)], horizontal=True, note=note,
        table_head=["agent", f"tokens in the last {window} (audit)", "used today (meter)", "daily budget", "share"],
        table=table,
    )  # fmt: skip


async def policy_versions(index: ConsoleIndex, window: str, now: float | None = None) -> Chart:
    """Each policy version in force in the window, in the order it took over, with its decision mix:
    reading along the axis shows the mix before and after each change."""
    first = int(((now or time.time()) - WINDOWS[window]) // SLOT)
    rows = await index.aggregate(
        "SELECT policy_version, MIN(first_ts), MAX(last_ts), SUM(n), SUM(n * (decision = 'allow')),"
        " SUM(n * (decision = 'deny')), SUM(n * (decision = 'error')) FROM slot_policy WHERE slot >= ?"
        " GROUP BY 1 HAVING SUM(n) > 0 ORDER BY 2 LIMIT 50",
        (first,),
    )
    labels, allow, deny, error, table = [], [], [], [], []
    previous: float | None = None
    for version, first, last, count, allowed, denied, errors in rows:
        when = datetime.fromtimestamp(first, UTC).strftime("%m-%d %H:%M")
        labels.append(f"{str(version)[:12]} ({when})")
        allow.append(allowed)
        deny.append(denied)
        error.append(errors)
        rate = denied / count if count else 0.0
        change = "" if previous is None else f"{(rate - previous) * 100:+.1f} points"
        previous = rate
        table.append([version, datetime.fromtimestamp(first, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                      datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%d %H:%M:%S"), count, allowed, denied,
                      errors, f"{rate:.1%}", change])  # fmt: skip
    return Chart(
        "policy-versions", "Policy versions over time, with the decision mix under each", "bar", labels,
        [("allow", allow), ("deny", deny), ("error", error)], stacked=True,
        table_head=["version", "first decided", "last decided", "calls", "allow", "deny", "error", "deny rate",
                    "change from the version before"],
        table=table,
    )  # fmt: skip


# Per window: how many 15-minute slots make one bar of the shadow chart (30 minutes, 4 hours, a day).
_SHADOW_BAR = {"24h": 2, "7d": 16, "30d": 96}
_SHADOW_SERIES = {"allow_to_deny": "allow → deny", "deny_to_allow": "deny → allow",
                  "obligations": "other obligations", "differs": "differs", "error": "shadow error"}  # fmt: skip


async def shadow_disagreements(index: ConsoleIndex, window: str, now: float | None = None) -> Chart:
    """Where the shadow policy (`policy.shadow_path`) would have decided otherwise, over time and by how,
    and per pair of live and shadow versions how often it agreed: read before promoting a candidate."""
    per_bar = _SHADOW_BAR[window]
    bars = WINDOWS[window] // (SLOT * per_bar)
    last = int((now or time.time()) // SLOT) + 1
    first = last - bars * per_bar
    rows = await index.aggregate(
        "SELECT (slot - ?) / ?, change, SUM(n) FROM slot_shadow WHERE slot >= ? AND slot < ? GROUP BY 1, 2"
        " HAVING SUM(n) != 0",
        (first, per_bar, first, last),
    )
    versions = await index.aggregate(
        "SELECT policy_version, shadow_version, SUM(n), SUM(n * (change = 'agree')),"
        " SUM(n * (change = 'allow_to_deny')), SUM(n * (change = 'deny_to_allow')),"
        " SUM(n * (change IN ('obligations', 'differs'))), SUM(n * (change = 'error')) FROM slot_shadow"
        " WHERE slot >= ? AND slot < ? GROUP BY 1, 2 HAVING SUM(n) != 0 ORDER BY MIN(slot), 1, 2 LIMIT 50",
        (first, last),
    )
    by_change: dict[str, list[float]] = {}
    for bar, change, count in rows:
        if change != "agree":
            by_change.setdefault(str(change), [0] * bars)[bar] += count
    fmt = "%H:%M" if window == "24h" else "%m-%d %H:%M" if window == "7d" else "%m-%d"
    labels = [datetime.fromtimestamp((first + i * per_bar) * SLOT, UTC).strftime(fmt) for i in range(bars)]
    order = [c for c in (*SHADOW_CHANGES, "error") if c in by_change]
    series = [(_SHADOW_SERIES[c], by_change[c]) for c in order] or [("disagreements", [0] * bars)]
    summary = []
    for live, shadow, decided, agree, to_deny, to_allow, other, errors in versions:
        differ = to_deny + to_allow + other
        rate = f"{differ / (decided - errors):.1%}" if decided - errors else ""
        summary.append([live or "?", shadow or "?", decided, agree, to_deny, to_allow, other, errors, rate])
    return Chart(
        "shadow-disagreements", "Shadow policy: calls it would have decided otherwise", "bar",
        labels if versions else [], series, stacked=True,
        empty="No shadow decisions in this window: set policy.shadow_path to decide a candidate policy beside the "
              "live one, never enforced (docs/shadow-and-replay.md).",
        summary_caption="Agreement per live and shadow policy version",
        summary_head=["live version", "shadow version", "decided by both", "agree", "allow → deny", "deny → allow",
                      "other obligations", "shadow errors", "disagreement rate"],
        summary=summary,
    )  # fmt: skip
