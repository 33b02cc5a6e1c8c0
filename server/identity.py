"""The caller: who an authenticated bearer token says the agent is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated agent. `agent_id` is the metering and audit key; groups drive grants and policy."""

    agent_id: str
    subject: str
    issuer: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    expires_at: int | None = None

    @property
    def principals(self) -> tuple[str, ...]:
        """Every principal name that grants may be made to: the agent, its subject and its groups."""
        names = [self.agent_id, self.subject, *self.groups]
        return tuple(dict.fromkeys(n for n in names if n))

    def as_input(self) -> dict[str, Any]:
        """The `identity` part of the policy decision input."""
        return {
            "agent_id": self.agent_id,
            "subject": self.subject,
            "groups": list(self.groups),
            "scopes": list(self.scopes),
        }
