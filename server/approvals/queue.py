"""The approval queue: makes (or finds) the request a call is bound to, waits for its decision, and
carries out approvers' decisions under the rules: only a member of the request's groups, never the
caller itself (same subject or same agent), only while pending, and one approval runs one call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from server.approvals.errors import ApprovalConflict, ApprovalForbidden, ApprovalNotFound, ApprovalRefused
from server.approvals.request import (
    Actor,
    ApprovalRequest,
    Status,
    actor_of,
    arguments_digest,
    binding_of,
    new_request_id,
    summarise,
)
from server.approvals.store import ApprovalStore, make_approval_store
from server.approvals.webhook import WebhookNotifier
from server.audit.redaction import Redactor
from server.call import Call
from server.errors import ConfigError
from server.identity import Identity
from server.policy.obligations import ApprovalObligation
from server.settings import ApprovalSettings, Settings

log = structlog.get_logger("castellan.approvals")


def is_own_call(approver: Identity | Actor, caller: Actor) -> bool:
    """Same subject or same agent, in either role: an agent's user cannot approve its agent's call, nor
    an agent its user's. Compared by name, whatever the issuer, so a second issuer cannot launder it."""
    mine = {approver.subject, approver.agent_id} - {""}
    return bool(mine & ({caller.subject, caller.agent_id} - {""}))


class ApprovalQueue:
    """Approval requests and the calls waiting on them. One per gateway process; the store is shared.

    `await_approval` raises `ApprovalRefused` (denied, timed out, approval taken by another call) or
    `BackendUnavailable` (the store cannot answer): never lets a call run without an approval.
    `approve`/`deny` raise `ApprovalNotFound`, `ApprovalForbidden` or `ApprovalConflict`."""

    def __init__(
        self,
        store: ApprovalStore,
        settings: ApprovalSettings,
        *,
        notifier: WebhookNotifier | None = None,
        redactor: Redactor | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._notifier = notifier
        self._redactor = redactor or Redactor()
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        self._outcomes = Counter(
            "castellan_approvals",
            "Approval requests by how they ended for the call (requested, approved, denied, expired, taken).",
            ["outcome"],
            registry=registry,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, redactor: Redactor, registry: CollectorRegistry | None = None
    ) -> ApprovalQueue:
        """The queue the settings describe, with its store and its webhook, which must be signed.
        Raises `ConfigError`."""
        cfg = settings.approvals
        notifier = None
        if cfg.webhook_url:
            secret = cfg.webhook_secret.get_secret_value() if cfg.webhook_secret is not None else ""
            if len(secret) < 16:
                raise ConfigError(
                    "approvals.webhook_url needs approvals.webhook_secret (16 characters or more) to sign it"
                )
            notifier = WebhookNotifier(cfg.webhook_url, secret.encode(), cfg.webhook_timeout_seconds)
        if not cfg.approval_page_url and settings.console.enabled:  # the console's page for one request
            cfg = cfg.model_copy(update={"approval_page_url": f"{settings.base_url}/console/approvals/{{id}}"})
        return cls(make_approval_store(settings), cfg, notifier=notifier, redactor=redactor, registry=registry)

    # The call's side --------------------------------------------------------------------------

    async def await_approval(
        self, call: Call, ask: ApprovalObligation, on_waiting: Callable[[ApprovalRequest], None] | None = None
    ) -> dict[str, Any]:
        """Wait until `call` is approved (returns what its audit record says about the approval).
        `on_waiting` is told the request once it exists (the in-band question to the agent's user)."""
        started = time.time()
        request = await self._request_for(call, ask, started)
        if on_waiting is not None:
            on_waiting(request)
        deadline = request.expires_at
        wakeup = asyncio.Event()
        self._wakeups.setdefault(request.id, set()).add(wakeup)
        log.info("approval_waiting", call_id=call.call_id, approval=request.id, tool=call.tool_name)
        try:
            while True:
                current = await self._store.get(request.id)
                if current is None:
                    raise ApprovalRefused("the approval request is gone", decision=call.decision)
                now = time.time()
                # The stored status, not the effective one: an approval given before the deadline counts
                # even when this waiter reads it just after.
                if current.status == "approved":
                    if await self._store.use(current.id, call.call_id):
                        self._outcomes.labels("approved").inc()
                        return current.audit_view(now, now - started)
                    continue  # taken by a retry of this same call meanwhile: read it again
                if current.status == "used":
                    self._outcomes.labels("taken").inc()
                    why = f"approval {current.id} was used by another call ({current.used_by})"
                    raise self._refused(call, current, now, started, why)
                if current.status == "denied":
                    self._outcomes.labels("denied").inc()
                    who = current.decided_by.subject or current.decided_by.agent_id if current.decided_by else "?"
                    why = f"approval denied by {who}" + (f": {current.comment}" if current.comment else "")
                    if current.decided_by is not None and is_own_call(current.decided_by, current.caller):
                        why = f"approval {current.id} {current.comment}"  # only `withdraw` decides so
                    raise self._refused(call, current, now, started, why)
                if current.status == "expired" or now >= deadline:
                    if current.status == "pending":
                        await self._store.expire(current.id)
                        continue  # an approval written just before the expiry still counts
                    self._outcomes.labels("expired").inc()
                    waited = round(now - started, 1)
                    groups = ", ".join(current.groups)
                    why = f"no approver decided within {waited:g} s (approval {current.id}, groups: {groups})"
                    raise self._refused(call, current, now, started, why)
                wakeup.clear()
                remaining = max(deadline - now, 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), min(self._settings.poll_interval_seconds, remaining) + 0.01)
        finally:
            waiting = self._wakeups.get(request.id)
            if waiting is not None:
                waiting.discard(wakeup)
                if not waiting:
                    del self._wakeups[request.id]

    def _refused(self, call: Call, request: ApprovalRequest, now: float, started: float, why: str) -> ApprovalRefused:
        return ApprovalRefused(why, decision=call.decision, approval=request.audit_view(now, now - started))

    async def _request_for(self, call: Call, ask: ApprovalObligation, now: float) -> ApprovalRequest:
        """The open request with this call's binding (a retry of the same call waits on the same one),
        else a new one, announced on the webhook."""
        assert call.identity is not None
        caller = actor_of(call.identity)
        digest = arguments_digest(call.arguments)
        binding = binding_of(call.tool_name, digest, caller, call.run.run_id)
        existing = await self._store.open_for(binding, now)
        if existing is not None:
            return existing
        fields = call.decision.obligations.get("redact_fields") if call.decision else None
        redactor = self._redactor.with_fields(fields) if isinstance(fields, list) else self._redactor
        shown: Mapping[str, Any] = redactor.apply(dict(call.arguments))
        spec = call.tool.spec if call.tool is not None else None
        annotations = dict(spec.annotations or {}) if spec is not None else {}
        securable = spec.securable if spec is not None else None
        timeout = min(ask.timeout_seconds or self._settings.timeout_seconds, self._settings.timeout_seconds)
        request = ApprovalRequest(
            id=new_request_id(),
            call_id=call.call_id,
            tool=call.tool_name,
            arguments=shown,
            arguments_sha256=digest,
            caller=caller,
            run_id=call.run.run_id,
            groups=ask.groups,
            reason=ask.reason,
            summary=redactor.apply(
                summarise(call.tool_name, securable, annotations, shown, caller, call.run.run_id, ask.reason)
            ),
            requested_at=now,
            expires_at=now + timeout,
            binding=binding,
            securable=securable,
            annotations=annotations,
        )
        await self._store.create(request)
        self._outcomes.labels("requested").inc()
        log.info("approval_requested", approval=request.id, call_id=call.call_id, tool=call.tool_name,
                 agent_id=caller.agent_id, groups=list(ask.groups), expires_in=timeout)  # fmt: skip
        self._announce("approval.requested", request)
        return request

    def approval_url(self, request_id: str) -> str:
        """The page where an approver decides this request ("" when none is configured)."""
        return self._settings.approval_page_url.replace("{id}", request_id)

    def _announce(self, event: str, request: ApprovalRequest) -> None:
        if self._notifier is None:
            return
        payload: dict[str, Any] = {"approval": request.as_document(time.time())}
        if url := self.approval_url(request.id):
            payload["approval_url"] = url
        self._notifier.notify(event, payload, until=request.expires_at)

    # The approver's side ----------------------------------------------------------------------

    async def get(self, request_id: str) -> ApprovalRequest | None:
        return await self._store.get(request_id)

    async def list(
        self, statuses: tuple[Status, ...] | None = ("pending",), limit: int = 100, offset: int = 0
    ) -> list[ApprovalRequest]:
        return await self._store.list(statuses, time.time(), limit, offset)

    async def approve(self, request_id: str, approver: Identity, comment: str = "") -> ApprovalRequest:
        return await self._decide(request_id, "approved", approver, comment)

    async def deny(self, request_id: str, approver: Identity, comment: str = "") -> ApprovalRequest:
        return await self._decide(request_id, "denied", approver, comment)

    async def withdraw(self, request_id: str, caller: Identity, comment: str) -> ApprovalRequest:
        """The call's own user withdrew it (declined the in-band question): denied, decided by the caller.
        The one decision a caller makes on their own call, and only this one. Raises `ApprovalConflict`
        when an approver decided first."""
        return await self._decide(request_id, "denied", caller, comment, withdrawn=True)

    async def _decide(
        self, request_id: str, status: Status, approver: Identity, comment: str, *, withdrawn: bool = False
    ) -> ApprovalRequest:
        request = await self._store.get(request_id)
        if request is None:
            raise ApprovalNotFound(f"no approval request {request_id}")
        verb = "approve" if status == "approved" else "deny"
        if withdrawn:
            if status != "denied" or not is_own_call(approver, request.caller):
                raise ApprovalForbidden(f"only the call's own caller may withdraw request {request_id}")
        elif is_own_call(approver, request.caller):
            log.warning("approval_refused_own_call", approval=request_id, approver=approver.subject,
                        approver_agent=approver.agent_id, caller=request.caller.as_dict())  # fmt: skip
            raise ApprovalForbidden(f"an approver can never {verb} their own call (request {request_id})")
        elif not set(approver.groups) & set(request.groups):
            log.warning("approval_refused_not_approver", approval=request_id, approver=approver.subject,
                        groups=list(approver.groups), approvers=list(request.groups))  # fmt: skip
            raise ApprovalForbidden(f"only members of {', '.join(request.groups)} may {verb} request {request_id}")
        now = time.time()
        by = actor_of(approver)
        if not await self._store.decide(request_id, status, by, comment, now):
            current = await self._store.get(request_id)
            state = current.effective_status(time.time()) if current else "gone"
            raise ApprovalConflict(f"request {request_id} is {state}, not pending")
        log.info("approval_decided", approval=request_id, status=status, approver=by.as_dict(),
                 call_id=request.call_id, tool=request.tool, comment=comment)  # fmt: skip
        for wakeup in self._wakeups.get(request_id, ()):
            wakeup.set()
        decided = request.decided(status, by, comment, now)
        self._announce("approval.decided", decided)
        return decided

    async def check(self) -> None:
        await self._store.check()

    async def close(self) -> None:
        if self._notifier is not None:
            await self._notifier.close()
        await self._store.close()
