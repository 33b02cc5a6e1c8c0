"""What can go wrong with an approval: a call refused for want of one, and an approver's act refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.errors import Denied
from server.policy.engine import Decision


class ApprovalRefused(Denied):
    """The call did not get its approval: an approver denied it, the wait timed out, or the queue could
    not answer (fail closed). `approval` is what the call's audit record says about it."""

    code = "approval_required"

    def __init__(
        self, *reasons: str, decision: Decision | None = None, approval: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__("approval", *reasons, decision=decision)
        self.approval = dict(approval) if approval is not None else None


class ApprovalActionError(Exception):
    """An approver's approve or deny that cannot be carried out. `status` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApprovalNotFound(ApprovalActionError):
    status = 404


class ApprovalForbidden(ApprovalActionError):
    """Not this approver: their own call (same subject or agent), or not in the request's groups."""

    status = 403


class ApprovalConflict(ApprovalActionError):
    """The request is no longer pending: decided already, expired, or used."""

    status = 409
