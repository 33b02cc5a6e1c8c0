"""A loopback reverse proxy that adds a bearer token: the MCP conformance suite has no option to
send one, and the gateway rightly refuses calls without it. Everything else (method, path, headers
including Host and Origin, body, streamed responses) passes through unchanged.

    python -m tests.conformance.auth_proxy --listen 8800 --target http://127.0.0.1:8750 --token-file T
"""

from __future__ import annotations

import argparse
from pathlib import Path

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def make_app(target: str, token: str) -> web.Application:
    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Authorization"] = f"Bearer {token}"
        body = await request.read()
        async with session.request(
            request.method, target + request.path_qs, headers=headers, data=body or None, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.target.rstrip("/"), args.token_file.read_text().strip()),
                host="127.0.0.1", port=args.listen, print=None)  # fmt: skip


if __name__ == "__main__":
    main()
