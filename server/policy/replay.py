"""Replay: the recorded calls of the audit outbox decided again by a candidate policy, and what would change.

Each decision record holds the input policy decided (`decision_input`, without the arguments and
the views computed from them, which are rebuilt from the record's arguments). Both are stored
redacted, so a rule that reads a redacted value (a secret's text, a field a `redact_fields`
obligation named) sees `[REDACTED]` where the live policy saw the value: docs/shadow-and-replay.md.
Detections were made on the original arguments and are recorded as they were, so guardrail rules
replay exactly.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from server.audit.search import AuditQuery
from server.policy._input import replay_document
from server.policy.engine import Decision, PolicyEngine
from server.policy.shadow import ALLOW_TO_DENY, DENY_TO_ALLOW, OBLIGATIONS, change

# Stages that refuse a call before policy is asked: a candidate policy cannot change those.
BEFORE_POLICY = frozenset({"authenticate", "resolve", "admit", "grants", "validate", "guard"})
CHANGES = (ALLOW_TO_DENY, DENY_TO_ALLOW, OBLIGATIONS)
_PAGE = 5_000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since_time(text: str, now: datetime | None = None) -> str:
    """`24h`, `30m`, `7d`, `2w` ago, or an ISO 8601 time, as the ISO time the audit search takes.
    Raises `ValueError` for anything else."""
    match = _DURATION.match(text.strip())
    if match:
        ago = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return ((now or datetime.now(UTC)) - ago).isoformat()
    datetime.fromisoformat(text.replace("Z", "+00:00"))  # raises ValueError when it is not a time
    return text


@dataclass(frozen=True, slots=True)
class Changed:
    """One recorded call the candidate decides otherwise."""

    call_id: str
    time: str
    agent_id: str
    tool: str
    change: str
    rules: tuple[str, ...]
    """The reasons of the side that denies (the candidate's for allow_to_deny, the recorded ones for
    deny_to_allow), or the obligations that differ."""
    before: Mapping[str, Any]
    after: Mapping[str, Any]


@dataclass
class ReplayReport:
    """What the candidate would change over the recorded calls examined."""

    policy_version: str
    examined: int = 0
    replayed: int = 0
    unchanged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    changed: list[Changed] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {c: sum(1 for x in self.changed if x.change == c) for c in CHANGES}

    def groups(self) -> list[dict[str, Any]]:
        """Changes grouped by change, tool and rule, biggest first; each with its calls."""
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for item in self.changed:
            for rule in item.rules or ("",):
                grouped.setdefault((item.change, item.tool, rule), []).append(item.call_id)
        rows = [
            {"change": c, "tool": t, "rule": r, "count": len(ids), "calls": ids} for (c, t, r), ids in grouped.items()
        ]
        return sorted(rows, key=lambda g: (CHANGES.index(g["change"]), -g["count"], g["tool"], g["rule"]))

    def as_json(self) -> dict[str, Any]:
        return {
            "policy_version": self.policy_version,
            "examined": self.examined,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "skipped": dict(sorted(self.skipped.items())),
            "changes": self.counts(),
            "groups": self.groups(),
            "calls": [
                {
                    "call_id": c.call_id,
                    "time": c.time,
                    "agent_id": c.agent_id,
                    "tool": c.tool,
                    "change": c.change,
                    "before": dict(c.before),
                    "after": dict(c.after),
                }
                for c in self.changed
            ],
        }


def recorded_decision(record: Mapping[str, Any]) -> Decision | None:
    """What policy decided for a recorded call, or None when policy did not decide it (a refusal
    before policy, or an engine that could not answer)."""
    stage, code = record.get("stage"), record.get("code")
    if stage == "policy":
        if code != "denied":
            return None  # the engine was down or failed: nothing the policy said to compare with
        return Decision(allow=False, reasons=tuple(sorted(record.get("reasons") or ())))
    if stage in BEFORE_POLICY:
        return None
    return Decision(allow=True, obligations=dict(record.get("obligations") or {}))


def _skip_reason(record: Mapping[str, Any]) -> str | None:
    if record.get("stage") in BEFORE_POLICY:
        return "refused_before_policy"
    if record.get("stage") == "policy" and record.get("code") != "denied":
        return "policy_unavailable"
    if not isinstance(record.get("decision_input"), Mapping):
        return "no_decision_input"  # recorded before the gateway kept it, or a bare refusal record
    return None


def _verdict(decision: Decision) -> dict[str, Any]:
    return {"allow": decision.allow, "reasons": list(decision.reasons), "obligations": dict(decision.obligations)}


def _rules(how: str, before: Decision, after: Decision) -> tuple[str, ...]:
    if how == ALLOW_TO_DENY:
        return after.reasons
    if how == DENY_TO_ALLOW:
        return before.reasons
    keys = set(before.obligations) | set(after.obligations)
    return tuple(sorted(f"obligation {k}" for k in keys if before.obligations.get(k) != after.obligations.get(k)))


async def replay(records: AsyncIterator[Mapping[str, Any]], engine: PolicyEngine) -> ReplayReport:
    """Decide every record of `records` again with `engine`; records policy did not decide are counted
    as skipped, by why."""
    report = ReplayReport(policy_version=engine.policy_version)
    async for record in records:
        report.examined += 1
        skip = _skip_reason(record)
        before = recorded_decision(record)
        if skip is not None or before is None:
            reason = skip or "policy_unavailable"
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        document = replay_document(record["decision_input"], record.get("arguments") or {})
        after = await engine.decide(document)
        report.replayed += 1
        how = change(before, after)
        if how is None:
            report.unchanged += 1
            continue
        report.changed.append(
            Changed(
                call_id=str(record.get("call_id")),
                time=str(record.get("time")),
                agent_id=str(record.get("agent_id")),
                tool=str(record.get("tool")),
                change=how,
                rules=_rules(how, before, after),
                before=_verdict(before),
                after=_verdict(after),
            )
        )
    return report


async def outbox_records(
    search: Callable[[AuditQuery], Any], *, since: str | None = None, agent: str | None = None, tool: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The decision records the audit search finds (`search`: `SqliteOutbox.search_async`), newest
    first, page by page; calls recorded after the replay started are left out, so paging never
    sees a record twice."""
    offset = 0
    until = datetime.now(UTC).isoformat()
    while True:
        page: Iterable[dict[str, Any]] = await search(
            AuditQuery(since=since, until=until, agent=agent, tool=tool, limit=_PAGE, offset=offset)
        )
        rows = list(page)
        for row in rows:
            yield row
        if len(rows) < _PAGE:
            return
        offset += len(rows)
