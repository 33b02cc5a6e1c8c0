"""The error hierarchy: stable codes, raised by stages, mapped to MCP results once in `server.protocol.tools`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.call import GrantCheck
    from server.policy.engine import Decision


class CastellanError(Exception):
    """A call that did not go through. `stage` names the pipeline stage; `reasons` are for the caller."""

    code = "internal_error"
    verdict = "deny"
    """What the call's record and result say was decided: a refusal is "deny", a bug is "error"."""

    def __init__(
        self, stage: str, *reasons: str, decision: Decision | None = None, grants: GrantCheck | None = None
    ) -> None:
        super().__init__(f"{stage}: {'; '.join(reasons) or self.code}")
        self.stage = stage
        self.reasons: tuple[str, ...] = reasons or (self.code,)
        self.decision = decision  # the policy decision, when policy was asked before the stop
        self.grants = grants  # what the grants stage found, when it refused: held and missing privileges


class Denied(CastellanError):
    """A stage decided the call must not run (policy, grants, limits)."""

    code = "denied"


class BackendUnavailable(CastellanError):
    """A backend could not answer. Fail closed: reported to the caller as a denial."""

    code = "backend_unavailable"


class InvalidArguments(CastellanError):
    """The tool arguments do not match the tool's input schema."""

    code = "invalid_arguments"


class AfterInvoke(CastellanError):
    """The tool ran (the call was allowed), then a later stage failed: charging, obligations or the
    outcome write. Never reported as a denial: the agent gets the tool's result, or, when the result
    could not be made safe to return (`withheld`), a clear error saying the tool ran."""

    code = "post_processing_failed"
    verdict = "allow"

    def __init__(self, stage: str, *reasons: str, withheld: bool, decision: Decision | None = None) -> None:
        super().__init__(stage, *reasons, decision=decision)
        self.withheld = withheld


class InternalError(CastellanError):
    """A bug. Never an allow; the details stay in the server log."""

    code = "internal_error"
    verdict = "error"


class Unauthenticated(Exception):
    """The bearer token is missing or not acceptable. Becomes HTTP 401 at the edge, never a tool result."""

    def __init__(self, description: str, *, error: str = "invalid_token") -> None:
        super().__init__(description)
        self.description = description
        self.error = error


class ConfigError(Exception):
    """The configuration cannot work. Stops start-up; never raised for a call."""


class NotFound(Denied):
    """What the call names does not exist (a resource URI, a prompt): audited like any refusal; at the
    edge a JSON-RPC invalid-params error for the methods that have no error result (SEP-2164)."""

    code = "not_found"
