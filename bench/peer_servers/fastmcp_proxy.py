"""fastmcp's proxy in front of one upstream, run by the fastmcp environment bench.peers builds.

    python fastmcp_proxy.py PORT UPSTREAM_URL fresh|reused

`fresh`: `create_proxy(url)`, fastmcp's default (a backend session per request, mirroring the front's era).
`reused`: `create_proxy(client)` with one connected backend client shared by every request.
Stand-alone on purpose: it imports nothing from Castellan.
"""

import asyncio
import sys

from fastmcp import Client
from fastmcp.server import create_proxy


async def main(port: int, upstream: str, strategy: str) -> None:
    if strategy == "fresh":
        await create_proxy(upstream).run_http_async(
            host="127.0.0.1", port=port, json_response=True, log_level="warning", show_banner=False
        )
        return
    async with Client(upstream) as client:
        await create_proxy(client).run_http_async(
            host="127.0.0.1", port=port, json_response=True, log_level="warning", show_banner=False
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
