"""The audit trail as an auditor reads it beside a running gateway (`castellan audit search`), once it
has settled: an allowed call's outcome is group-committed after its response, within
`audit.outcome_commit_seconds` (docs/audit.md), so a search made the moment a call returns may show
its decision without its outcome yet. `settled_audit` waits for that, bounded, and returns what it
found when the bound passes, for the test's own assertion to report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.gateway_process import GatewayProcess, run_cli

Records = list[dict[str, Any]]


def audit_search(gw: GatewayProcess, *args: str) -> Records:
    """`castellan audit search ARGS --format jsonl`, as a user runs it beside the gateway."""
    done = run_cli(gw, "audit", "search", *args, "--format", "jsonl", timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def outcomes_committed(records: Records) -> bool:
    """Every allowed call found has its outcome (a denied one never has)."""
    return all(r.get("outcome") is not None for r in records if r.get("decision") == "allow")


def settled_audit(
    gw: GatewayProcess, *args: str, until: Callable[[Records], bool] = outcomes_committed, timeout: float = 30.0
) -> Records:
    """`audit_search(ARGS)` once `until(records)` holds, or as it stands after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = audit_search(gw, *args)
        if until(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)
