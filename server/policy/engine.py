"""The policy engine contract: a decision input in, a `Decision` out, never an allow on error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.policy.bundle import PolicyBundle


@dataclass(frozen=True, slots=True)
class LogMask:
    """The decision log's mask for one decision's event, evaluated by the embedded engine in the same
    call as the decision (the input parsed once): the mask bundle's version (`log_mask_bundle`), the
    document decided (the very object), the result the mask was given, and the mask's value (None
    when undefined). The decision log uses it only when all three match its own."""

    mask_version: str
    document: Mapping[str, Any]
    result: Any
    value: Any


@dataclass(frozen=True, slots=True)
class Decision:
    """What policy said about one call. Reasons are sorted; obligations hold only keys the gateway knows."""

    allow: bool
    reasons: tuple[str, ...] = ()
    obligations: Mapping[str, Any] = field(default_factory=dict)
    policy_version: str = ""
    engine: str = ""
    decision_id: str = ""
    eval_ms: float = 0.0
    shadow: Mapping[str, Any] | None = None
    """What the shadow policy (`policy.shadow_path`) said about the same input, and whether it differs
    (server/policy/shadow.py); never enforced. None when no shadow policy is configured."""
    log_mask: LogMask | None = field(default=None, compare=False, repr=False)
    """The decision log's mask, when the engine evaluated it with the decision (`LogMask`)."""

    @classmethod
    def deny(cls, *reasons: str, policy_version: str = "", engine: str = "") -> Decision:
        return cls(allow=False, reasons=reasons, policy_version=policy_version, engine=engine)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """The outcome of `load`: the bundle now deciding, or why the previous one still is."""

    loaded: bool
    policy_version: str
    errors: tuple[str, ...] = ()


class PolicyEngine(Protocol):
    """Decides calls with Rego.

    `decide` never raises for a policy problem: an undefined result, an evaluation error or a
    malformed result is a deny with the reason. It raises `BackendUnavailable` only when the
    engine itself cannot be reached or does not answer in time.
    `load` validates a bundle, then swaps it in; a bundle that does not validate is refused and
    the previous one keeps deciding.
    """

    name: str

    @property
    def policy_version(self) -> str: ...

    async def load(self, bundle: PolicyBundle) -> LoadReport: ...

    async def decide(self, document: Mapping[str, Any]) -> Decision: ...

    async def check(self) -> None:
        """Raise `BackendUnavailable` when the engine cannot decide (for `/readyz`)."""
        ...

    async def close(self) -> None: ...
