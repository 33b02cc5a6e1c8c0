"""The approval webhook: each new request (and each decision) POSTed as JSON to a configured URL,
signed with HMAC-SHA256, retried with backoff until the request expires; never on the call's path.

The signature header is `X-Castellan-Signature: t=<unix seconds>,v1=<hex>` where `<hex>` is
HMAC-SHA256(secret, f"{t}.{body}"): the timestamp is signed so a captured delivery cannot be replayed
later (`verify_signature` checks both). `X-Castellan-Delivery` is the same on every retry of one
delivery, so a receiver can drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("castellan.approvals")

SIGNATURE_HEADER = "X-Castellan-Signature"
EVENT_HEADER = "X-Castellan-Event"
DELIVERY_HEADER = "X-Castellan-Delivery"
_RETRYABLE = {408, 425, 429}
_MAX_BACKOFF = 30.0


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: bytes, header: str, body: bytes, *, tolerance_seconds: float = 300.0) -> bool:
    """True when `header` is a valid signature of `body` made within `tolerance_seconds` of now."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")


class WebhookNotifier:
    """Delivers events in background tasks. `notify` returns at once; a delivery is retried (connection
    errors, 5xx, 408/425/429) with exponential backoff until it succeeds or `until` passes. A 4xx
    otherwise is final (the receiver refused it; retrying would not change that). `close` cancels
    what is still being retried."""

    def __init__(self, url: str, secret: bytes, timeout_seconds: float) -> None:
        self._url = url
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def notify(self, event: str, payload: dict[str, Any], until: float) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(event, payload, until))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: str, payload: dict[str, Any], until: float) -> None:
        body = json.dumps({"event": event, **payload}, separators=(",", ":"), default=str).encode()
        delivery = secrets.token_hex(8)
        delay = 0.25
        attempt = 0
        while True:
            attempt += 1
            outcome = await self._attempt(event, body, delivery)
            if outcome is None:
                self.delivered += 1
                log.info("approval_webhook_delivered", approval_event=event, delivery=delivery, attempts=attempt)
                return
            final, why = outcome
            if final or time.time() + delay >= until:
                self.failed += 1
                log.warning(
                    "approval_webhook_failed", approval_event=event, delivery=delivery, attempts=attempt, error=why
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)

    async def _attempt(self, event: str, body: bytes, delivery: str) -> tuple[bool, str] | None:
        """None when delivered; else whether the failure is final, and why."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery,
        }
        try:
            async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return None
                return (resp.status < 500 and resp.status not in _RETRYABLE, f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return (False, f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
