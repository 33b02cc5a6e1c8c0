"""A fake OpenAI-compatible chat completions API (the hosted API cannot be reached from here).

It speaks the documented wire format of `POST /v1/chat/completions`: a `chat.completion` object with
`choices[].message` (one per `n`) and `usage` {prompt_tokens, completion_tokens, total_tokens}; with
`stream: true`, server-sent events of `chat.completion.chunk` objects (`choices[].delta`, each with
its `index`), then — when `stream_options.include_usage` is set — a last chunk with empty `choices`
and the `usage`, then `data: [DONE]`. It replies with a fixed text and records each request
(headers and body) for the test.

With `fill = True` it behaves like a model that writes until it is stopped: each choice is as long
as the request allows, and like some providers it honours `max_tokens` over `max_completion_tokens`
when both are sent. `delay_seconds` holds each request before answering (calls in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.loopback import serve_app

REPLY = "The answer is forty-two, as everybody knows."
FILL_DEFAULT = 1024  # what a model writes when no limit is sent


@dataclass
class FakeOpenAI:
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    prompt_tokens: int = 21
    completion_tokens: int = 11
    fill: bool = False
    delay_seconds: float = 0.0
    produced: int = 0
    """Every token it reported as used (prompt and completion), over all requests."""
    in_flight: int = 0

    def _choice_tokens(self, body: dict[str, Any]) -> int:
        if not self.fill:
            return self.completion_tokens
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int):
                return int(body[name])
        return FILL_DEFAULT

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        self.in_flight += 1
        try:
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        n = int(body.get("n") or 1)
        per_choice = self._choice_tokens(body)
        text = REPLY if not self.fill else " ".join(["x"] * per_choice)
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": per_choice * n,
            "total_tokens": self.prompt_tokens + per_choice * n,
        }
        self.produced += usage["total_tokens"]
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body.get("model", "")}
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        for i in range(n)
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)]
        )
        for word in text.split(" "):
            await send([{"index": i, "delta": {"content": word + " "}, "finish_reason": None} for i in range(n)])
        await send([{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(n)])
        if (body.get("stream_options") or {}).get("include_usage"):
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        return response


@contextlib.asynccontextmanager
async def serve() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    """Yields (fake, base URL ending in /v1)."""
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completions)
    async with serve_app(app) as url:
        yield fake, f"{url}/v1"
