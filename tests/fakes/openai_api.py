"""A fake OpenAI-compatible chat completions API (the hosted API cannot be reached from here).

It speaks the documented wire format of `POST /v1/chat/completions`: a `chat.completion` object with
`choices[].message` and `usage` {prompt_tokens, completion_tokens, total_tokens}; with `stream: true`,
server-sent events of `chat.completion.chunk` objects (`choices[].delta`), then — when
`stream_options.include_usage` is set — a last chunk with empty `choices` and the `usage`, then
`data: [DONE]`. It replies with a fixed text and records each request (headers and body) for the test.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.loopback import serve_app

REPLY = "The answer is forty-two, as everybody knows."


@dataclass
class FakeOpenAI:
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    prompt_tokens: int = 21
    completion_tokens: int = 11

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body.get("model", "")}
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(chunk: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send(
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            }
        )
        for word in REPLY.split(" "):
            await send(
                {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
                }
            )
        await send(
            {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
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
