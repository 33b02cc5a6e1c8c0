"""The caller: who an authenticated bearer token says the agent is, as typed Unity Catalog principals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PrincipalKind = Literal["user", "service_principal", "group"]
SubjectKind = Literal["user", "service_principal"]
PRINCIPAL_KINDS: tuple[PrincipalKind, ...] = ("user", "service_principal", "group")
ACCOUNT_USERS = "account users"
"""Unity Catalog's implicit group: every principal is in it."""


@dataclass(frozen=True, slots=True, order=True)
class Principal:
    """A name of one kind, as Unity Catalog types principals. Two principals with the same name and
    different kinds are different principals: a grant to the group `admins` is not a grant to a
    user or service principal called `admins`."""

    kind: PrincipalKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.replace('_', ' ')} {self.name}"

    def as_input(self) -> dict[str, str]:
        return {"type": self.kind, "name": self.name}


def user(name: str) -> Principal:
    return Principal("user", name)


def service_principal(name: str) -> Principal:
    return Principal("service_principal", name)


def group(name: str) -> Principal:
    return Principal("group", name)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated agent. `agent_id` is the metering and audit key; `principals` drive grants.

    Principal kinds (docs/grants.md states the mapping from token claims): the agent is a service
    principal (an OAuth client acting on its own), or the subject itself when the token names no agent
    apart from its subject; the subject is `subject_kind` (by default: the agent itself, a service
    principal, when it has the agent's name, otherwise a user on whose behalf the agent acts); every
    group the token names is a group."""

    agent_id: str
    subject: str
    issuer: str
    groups: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    expires_at: int | None = None
    subject_kind: SubjectKind | None = None
    """None: a service principal when `subject == agent_id` (client credentials), else a user."""
    agent_is_subject: bool = False
    """The token names no agent of its own (its agent id is its subject): one principal, not two."""
    _principals: tuple[Principal, ...] | None = field(default=None, init=False, repr=False, compare=False)
    """`principals`, once computed: an identity is read by several stages per call, and a verified
    token's identity is reused by its later calls."""

    @property
    def subject_type(self) -> SubjectKind:
        if self.subject_kind is not None:
            return self.subject_kind
        return "service_principal" if not self.subject or self.subject == self.agent_id else "user"

    @property
    def principals(self) -> tuple[Principal, ...]:
        """Every principal grants may be made to: the agent, its subject and its groups, each typed.
        `account users` is not listed: grant sources add it for every caller."""
        known = self._principals
        if known is None:
            known = self._typed_principals()
            object.__setattr__(self, "_principals", known)  # frozen: a cache of what the fields imply
        return known

    def _typed_principals(self) -> tuple[Principal, ...]:
        found: list[Principal] = []
        if not self.agent_is_subject and self.agent_id:
            found.append(service_principal(self.agent_id))
        if self.subject or self.agent_is_subject:
            found.append(Principal(self.subject_type, self.subject or self.agent_id))
        found.extend(group(g) for g in self.groups if g)
        return tuple(dict.fromkeys(found))

    def as_input(self) -> dict[str, Any]:
        """The `identity` part of the policy decision input."""
        return {
            "agent_id": self.agent_id,
            "subject": self.subject,
            "groups": list(self.groups),
            "scopes": list(self.scopes),
            "subject_type": self.subject_type,
            "principals": [p.as_input() for p in self.principals],
        }
