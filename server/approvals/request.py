"""An approval request: the call it is bound to, what the approver is shown, and how it was decided."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from server.identity import Identity

Status = Literal["pending", "approved", "denied", "expired", "used"]
STATUSES: tuple[Status, ...] = ("pending", "approved", "denied", "expired", "used")
"""`pending` until an approver decides; `approved` until the waiting call takes it, then `used` (an
approval lets exactly one call run); `denied`; `expired` when nobody decided in time."""


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """SHA-256 of the arguments as canonical JSON (sorted keys, no spaces): an approval covers exactly
    these arguments, however a client orders their members."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def binding_of(tool: str, arguments_sha256: str, caller: Actor, run_id: str) -> str:
    """The key an approval is bound to: tool, arguments, identity (issuer, subject, agent) and run."""
    parts = [tool, arguments_sha256, caller.issuer, caller.subject, caller.agent_id, run_id]
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def new_request_id() -> str:
    return f"apr_{secrets.token_urlsafe(12)}"


def iso(moment: float | None) -> str | None:
    return datetime.fromtimestamp(moment, UTC).isoformat() if moment is not None else None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made the call waiting for approval, or who decided it, as their token said."""

    agent_id: str
    subject: str
    issuer: str
    groups: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "subject": self.subject, "issuer": self.issuer, "groups": list(self.groups)}


def actor_of(identity: Identity) -> Actor:
    return Actor(identity.agent_id, identity.subject, identity.issuer, tuple(identity.groups))


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One call waiting for a human. Immutable once made except for its decision and use, so what the
    approver is shown (`summary`, `arguments`) is what the call will do."""

    id: str
    call_id: str
    tool: str
    arguments: Mapping[str, Any]
    """As shown to approvers: redacted as the audit log is (secrets never reach the queue)."""
    arguments_sha256: str
    caller: Actor
    run_id: str
    groups: tuple[str, ...]
    """Who may approve: a member of any of these groups (never the caller itself)."""
    reason: str
    summary: str
    """The text the approver is shown: what the call would do, who asks, and the policy's reason."""
    requested_at: float
    expires_at: float
    binding: str
    securable: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)
    status: Status = "pending"
    decided_by: Actor | None = None
    decided_at: float | None = None
    comment: str = ""
    used_by: str | None = None
    """The call id that ran on this approval (status `used`)."""

    def effective_status(self, now: float) -> Status:
        """`pending` and `approved` turn `expired` at `expires_at`, whether or not anyone wrote it down."""
        if self.status in ("pending", "approved") and now >= self.expires_at:
            return "expired"
        return self.status

    def decided(self, status: Status, by: Actor, comment: str, at: float) -> ApprovalRequest:
        return replace(self, status=status, decided_by=by, decided_at=at, comment=comment)

    def as_document(self, now: float) -> dict[str, Any]:
        """The request as the admin API, the CLI, the console and the webhook show it."""
        return {
            "id": self.id,
            "status": self.effective_status(now),
            "call_id": self.call_id,
            "tool": self.tool,
            "securable": self.securable,
            "annotations": dict(self.annotations),
            "arguments": dict(self.arguments),
            "arguments_sha256": self.arguments_sha256,
            "caller": self.caller.as_dict(),
            "run_id": self.run_id,
            "approvers": list(self.groups),
            "reason": self.reason,
            "summary": self.summary,
            "requested_at": iso(self.requested_at),
            "expires_at": iso(self.expires_at),
            "decided_by": self.decided_by.as_dict() if self.decided_by else None,
            "decided_at": iso(self.decided_at),
            "comment": self.comment,
            "used_by": self.used_by,
        }

    def audit_view(self, now: float, waited_seconds: float) -> dict[str, Any]:
        """What the call's audit record (and its MLflow span) says: who decided, when, and what they saw."""
        return {
            "id": self.id,
            "status": self.effective_status(now) if self.status != "used" else "approved",
            "approvers": list(self.groups),
            "reason": self.reason,
            "summary": self.summary,
            "arguments_sha256": self.arguments_sha256,
            "requested_at": iso(self.requested_at),
            "expires_at": iso(self.expires_at),
            "decided_by": self.decided_by.as_dict() if self.decided_by else None,
            "decided_at": iso(self.decided_at),
            "comment": self.comment,
            "waited_ms": round(waited_seconds * 1000, 1),
        }


def summarise(
    tool: str,
    securable: str | None,
    annotations: Mapping[str, Any],
    arguments: Mapping[str, Any],
    caller: Actor,
    run_id: str,
    reason: str,
) -> str:
    """The few lines an approver reads: who asks, to do what, with which arguments, and why policy asks."""
    traits = [k.removesuffix("Hint") for k in ("destructiveHint", "openWorldHint") if annotations.get(k) is True]
    if annotations.get("readOnlyHint") is True:
        traits.append("read-only")
    on_behalf = f" for {caller.subject}" if caller.subject and caller.subject != caller.agent_id else ""
    shown = json.dumps(arguments, sort_keys=True, ensure_ascii=False, default=str)
    if len(shown) > 2000:
        shown = shown[:2000] + f"… ({len(shown):,} characters)"
    lines = [
        f"Agent {caller.agent_id}{on_behalf} (groups: {', '.join(caller.groups) or 'none'}) asks to call "
        f"{tool}" + (f" ({securable}" + (f"; {', '.join(traits)}" if traits else "") + ")" if securable else ""),
        f"Arguments: {shown}",
        f"Run: {run_id}",
    ]
    if reason:
        lines.append(f"Why approval is needed: {reason}")
    return "\n".join(lines)
