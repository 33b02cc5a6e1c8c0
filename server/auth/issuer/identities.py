"""Who can sign in at the dev issuer: the demo's users and agents, with the groups the demo grants expect."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

OPERATOR_SCOPES = ("castellan:admin", "castellan:audit", "castellan:approve", "castellan:metrics")
"""The gateway's own operator scopes (admin API, console, approvals, /metrics): only admins get them."""


@dataclass(frozen=True, slots=True)
class DemoIdentity:
    """One identity on the dev sign-in page.

    A `user` signs in through an MCP client: the token's subject is the user and its agent is the OAuth
    client. An `agent` signs in as itself (subject = agent, a service principal), as `castellan token
    --agent NAME` mints it. `operator` identities may be granted the gateway's operator scopes; every
    identity may be granted any other scope a client asks for (the sign-in page lets the person untick
    some, which is how a step-up is tried out)."""

    name: str
    kind: Literal["user", "agent"]
    groups: tuple[str, ...]
    description: str
    operator: bool = False

    def may_have(self, scope: str) -> bool:
        return self.operator or not scope.startswith("castellan:")

    def default_scopes(self) -> tuple[str, ...]:
        """What a client that asks for no scope gets (RFC 6749 §3.3: the server's default)."""
        return OPERATOR_SCOPES if self.operator else ()

    def grantable(self, requested: Iterable[str]) -> list[str]:
        return [s for s in dict.fromkeys(requested) if self.may_have(s)]


DEMO_IDENTITIES: tuple[DemoIdentity, ...] = (
    DemoIdentity("alice", "user", ("analysts",), "analyst: the demo tools and sales data, not customers"),
    DemoIdentity("olivia", "user", ("admins",), "administrator: every tool, the console, approvals", operator=True),
    DemoIdentity("demo-agent", "agent", ("analysts",), "an agent in the analysts group, acting as itself"),
    DemoIdentity("ops-agent", "agent", ("admins",), "an agent in the admins group, acting as itself", operator=True),
)


def demo_identity(name: str) -> DemoIdentity | None:
    return next((i for i in DEMO_IDENTITIES if i.name == name), None)
