"""In band: the agent's user is told, by MCP elicitation, of the approval their call waits for, and
may withdraw the call. Form mode shows the call summarised; URL mode (when the client takes it and
`approvals.approval_page_url` is set) points at the approval page.

The user cannot approve here: they are the call's own subject, and nobody approves their own call.
Accepting keeps the call waiting for an approver; declining or cancelling withdraws it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

import structlog

from server.approvals.request import ApprovalRequest, iso
from server.relay.channel import ELICIT, AgentChannel, RelayFailed, RelayUnsupported

log = structlog.get_logger("castellan.approvals")


@dataclass(frozen=True, slots=True)
class UserAnswer:
    """What the agent's user was shown and did with it (never what they typed: the form has no fields)."""

    mode: str
    """`form` or `url`."""
    message: str
    url: str | None
    asked_at: float
    action: str
    """`accept`, `decline`, `cancel`, or `unanswered` (no answer before the approval was decided, or the
    client failed to show it)."""
    answered_at: float | None = None

    @property
    def withdraws(self) -> bool:
        return self.action in ("decline", "cancel")

    def as_record(self) -> dict[str, Any]:
        """The `in_band` member of the call's `approval` audit record (and of its MLflow span)."""
        return {
            "mode": self.mode,
            "message": self.message,
            "url": self.url,
            "asked_at": iso(self.asked_at),
            "action": self.action,
            "answered_at": iso(self.answered_at),
        }


def can_ask(channel: AgentChannel | None) -> bool:
    return channel is not None and channel.supports(ELICIT)


def _takes_urls(channel: AgentChannel) -> bool:
    capabilities = getattr(channel, "capabilities", None)
    elicitation = getattr(capabilities, "elicitation", None)
    return getattr(elicitation, "url", None) is not None


def elicitation_for(request: ApprovalRequest, channel: AgentChannel, page_url: str) -> tuple[str, dict[str, Any]]:
    """The mode and the `elicitation/create` params for `request`."""
    groups = ", ".join(request.groups)
    until = iso(request.expires_at)
    if page_url and _takes_urls(channel):
        message = (
            f"This call waits for approval by {groups} (until {until}).\n{request.summary}\n"
            "An approver signs in at this page to decide. Decline here to withdraw the call."
        )
        return "url", {"mode": "url", "message": message, "url": page_url, "elicitationId": request.id}
    message = (
        f"{request.summary}\n\nThis call waits for approval by {groups} (until {until}). "
        "Accept to keep it waiting for them; decline to withdraw it."
    )
    return "form", {"mode": "form", "message": message, "requestedSchema": {"type": "object", "properties": {}}}


class Question:
    """One elicitation of the agent's user about the request their call waits on, asked in the
    background (`start`); `answer()` is what they did so far (`unanswered` until they answer)."""

    def __init__(self, channel: AgentChannel, request: ApprovalRequest, page_url: str) -> None:
        self.request = request
        self.mode, self._params = elicitation_for(request, channel, page_url)
        self.asked = UserAnswer(self.mode, self._params["message"], self._params.get("url"), time.time(), "unanswered")
        self.task: asyncio.Task[UserAnswer] = asyncio.get_running_loop().create_task(
            self._ask(channel), name=f"approval-question-{request.id}"
        )

    async def _ask(self, channel: AgentChannel) -> UserAnswer:
        """Never raises for the client's failure: that is `unanswered`, and the call goes on waiting."""
        log.info("approval_elicitation_asked", approval=self.request.id, mode=self.mode)
        try:
            result = await channel.request(ELICIT, self._params)
        except (RelayUnsupported, RelayFailed) as exc:
            log.info("approval_elicitation_unanswered", approval=self.request.id, mode=self.mode, error=str(exc))
            return self.asked
        action = result.get("action")
        answer = replace(
            self.asked,
            action=action if action in ("accept", "decline", "cancel") else "unanswered",
            answered_at=time.time(),
        )
        log.info("approval_elicitation_answered", approval=self.request.id, mode=self.mode, action=answer.action)
        return answer

    def answer(self) -> UserAnswer:
        if self.task.done() and not self.task.cancelled() and self.task.exception() is None:
            return self.task.result()
        return self.asked

    def stop(self) -> None:
        """The approval was decided (or the call ended): the question no longer matters."""
        self.task.cancel()
