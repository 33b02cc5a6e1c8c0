"""The approval webhook: signed, retried on what may pass, final on what will not, never blocking."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from aiohttp import web

from server.approvals.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, WebhookNotifier, sign, verify_signature
from tests.gateway_process import free_port

pytestmark = pytest.mark.anyio
SECRET = b"0123456789abcdef-secret"


async def serve(statuses: list[int]) -> tuple[str, list[web.Request], list[bytes], web.AppRunner]:
    seen: list[web.Request] = []
    bodies: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(request)
        bodies.append(await request.read())
        return web.Response(status=statuses[min(len(seen), len(statuses)) - 1])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}/hook", seen, bodies, runner


async def settle(notifier: WebhookNotifier, until: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):  # the deliveries run in the notifier's own tasks
        if until():
            return
        await asyncio.sleep(0.02)


async def test_a_delivery_is_signed_and_retried_until_it_is_taken() -> None:
    url, seen, bodies, runner = await serve([503, 429, 204])
    notifier = WebhookNotifier(url, SECRET, 2.0)
    try:
        notifier.notify("approval.requested", {"approval": {"id": "apr_1"}}, until=time.time() + 30)
        await settle(notifier, lambda: notifier.delivered == 1)
        assert len(seen) == 3
        assert len({r.headers[DELIVERY_HEADER] for r in seen}) == 1  # one delivery, three attempts
        assert json.loads(bodies[-1]) == {"event": "approval.requested", "approval": {"id": "apr_1"}}
        assert verify_signature(SECRET, seen[-1].headers[SIGNATURE_HEADER], bodies[-1])
        assert not verify_signature(b"another secret, 16+ chars", seen[-1].headers[SIGNATURE_HEADER], bodies[-1])
    finally:
        await notifier.close()
        await runner.cleanup()


async def test_a_refusal_by_the_receiver_is_final() -> None:
    url, seen, _, runner = await serve([401])
    notifier = WebhookNotifier(url, SECRET, 2.0)
    try:
        notifier.notify("approval.requested", {}, until=time.time() + 30)
        await settle(notifier, lambda: notifier.failed == 1)
        await asyncio.sleep(0.5)
        assert len(seen) == 1
    finally:
        await notifier.close()
        await runner.cleanup()


async def test_retries_stop_when_the_request_expires_and_notify_never_waits() -> None:
    notifier = WebhookNotifier(f"http://127.0.0.1:{free_port()}/hook", SECRET, 0.5)  # nobody listens
    started = time.monotonic()
    notifier.notify("approval.requested", {}, until=time.time() + 1.0)
    assert time.monotonic() - started < 0.1  # scheduled, not delivered, by notify
    await settle(notifier, lambda: notifier.failed == 1)
    assert notifier.failed == 1
    await notifier.close()


def test_a_signature_is_bound_to_the_body_and_its_time() -> None:
    body = b'{"event":"approval.decided"}'
    now = int(time.time())
    assert verify_signature(SECRET, sign(SECRET, body, now), body)
    assert not verify_signature(SECRET, sign(SECRET, body, now), body + b" ")
    assert not verify_signature(SECRET, sign(SECRET, body, now - 3600), body)  # replayed an hour later
    assert not verify_signature(SECRET, "v1=abc", body)
    assert not verify_signature(SECRET, "garbage", body)
