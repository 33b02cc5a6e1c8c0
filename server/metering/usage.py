"""Usage reports: an agent's consumption against its limits, as a document and as a table."""

from __future__ import annotations

from typing import Any

from server.metering.meter import Usage


def usage_document(usage: Usage) -> dict[str, Any]:
    def rows(kind: str) -> list[dict[str, Any]]:
        return [
            {"window": w.window, "used": w.used, "limit": w.limit or None, "resets_in_s": w.resets_in}
            for w in getattr(usage, kind)
        ]

    return {
        "agent_id": usage.agent_id,
        "calls": rows("calls"),
        "tokens": rows("tokens"),
        "in_flight": usage.in_flight,
        "reserved_tokens": usage.reserved_tokens,
        "limits": usage.limits.model_dump(),
    }


def usage_table(usage: Usage) -> str:
    lines = [
        f"agent {usage.agent_id}: {usage.in_flight} calls in flight, {usage.reserved_tokens} tokens reserved",
        f"{'what':<8}{'window':<8}{'used':>12}{'limit':>12}{'resets in':>12}",
    ]
    for kind in ("calls", "tokens"):
        for w in getattr(usage, kind):
            limit = str(w.limit) if w.limit else "unlimited"
            lines.append(f"{kind:<8}{w.window:<8}{w.used:>12}{limit:>12}{w.resets_in:>11}s")
    return "\n".join(lines)
