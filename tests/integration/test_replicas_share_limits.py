"""Two gateway processes sharing one redis-server: limits hold exactly across replicas."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.gateway_process import run_cli, run_gateway
from tests.integration.conftest import deny_body, raw_call
from tests.redis_server import run_redis

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def whole_minute_ahead(needed: float) -> None:
    """Calls-per-minute is a fixed UTC window: start once at least `needed` seconds of the current
    minute are left, so the calls, the admin report and the CLI (a process start) all read one window
    instead of the count restarting between them."""
    left = 60.0 - time.time() % 60.0
    if left < needed:
        await asyncio.sleep(left + 0.05)


async def test_two_replicas_on_one_redis_admit_exactly_the_limit(tmp_path: Path) -> None:
    with run_redis() as redis:
        env = {
            "CASTELLAN_METERING__BACKEND": "redis",
            "CASTELLAN_METERING__REDIS_URL": redis.url,
            "CASTELLAN_METERING__AGENTS": json.dumps({"shared-bot": {"calls_per_minute": 10}}),
        }
        # Both replicas verify tokens with the same key: the second reuses the first's data directory key.
        with run_gateway(tmp_path / "a", env) as first:
            (tmp_path / "b").mkdir()
            (tmp_path / "b" / "dev-signing-key.json").write_bytes(
                (tmp_path / "a" / "dev-signing-key.json").read_bytes()
            )
            with run_gateway(tmp_path / "b", env) as second:
                replicas = [first, second]
                tokens = [g.token("shared-bot", ["analysts"]) for g in replicas]
                await whole_minute_ahead(20.0)
                results = await asyncio.gather(
                    *(raw_call(replicas[i % 2], tokens[i % 2], "echo", {"text": f"call {i}"}) for i in range(30))
                )
                allowed = [r for r in results if not r["isError"]]
                denied = [deny_body(r) for r in results if r["isError"]]
                assert len(allowed) == 10, denied[:2]
                assert len(denied) == 20
                assert all(d["reasons"][0].startswith("rate limit: 10 of 10 calls per minute used") for d in denied)

                admin = second.token("ops", scopes=["castellan:admin"])  # tokens name their audience
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(
                        f"{second.base_url}/admin/usage",
                        params={"agent": "shared-bot", "groups": "analysts"},
                        headers={"authorization": f"Bearer {admin}"},
                    ) as resp,
                ):
                    report = await resp.json()
                minute = next(w for w in report["calls"] if w["window"] == "minute")
                assert (minute["used"], minute["limit"]) == (10, 10)
                assert report["in_flight"] == 0

                cli = await asyncio.to_thread(run_cli, first, "usage", "--agent", "shared-bot", "--json")
                assert cli.returncode == 0, cli.stderr
                assert next(w for w in json.loads(cli.stdout)["calls"] if w["window"] == "minute")["used"] == 10
