"""A gateway SIGKILLed mid-calls: the next one frees what the dead process held, at once, on SQLite and Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import openai_api
from tests.gateway_process import GatewayProcess, run_gateway
from tests.redis_server import RedisProcess, run_redis

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
AGENT = "busy-bot"
IN_FLIGHT = 8
CONCURRENCY = 12


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with run_redis() as server:
        yield server


async def usage(gw: GatewayProcess) -> dict[str, Any]:
    admin = gw.token("ops", scopes=["castellan:admin"])
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.base_url}/admin/usage", params={"agent": AGENT}, headers={"authorization": f"Bearer {admin}"}) as r,
    ):
        assert r.status == 200
        return dict(await r.json())


async def chat(gw: GatewayProcess, token: str, i: int) -> tuple[int, str]:
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4000}
    headers = {"authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.base_url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        return r.status, await r.text()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_after_a_sigkill_mid_calls_the_limits_free_up_right_after_restart(
    tmp_path: Path, redis: RedisProcess, store: str
) -> None:
    env = {
        "CASTELLAN_LLM__MODELS": json.dumps({"gpt-fake": {}}),
        "CASTELLAN_METERING__AGENTS": json.dumps({AGENT: {"concurrent_calls": CONCURRENCY, "tokens_per_day": 200_000}}),
        "CASTELLAN_METERING__RESERVATION_TTL_SECONDS": "300",
    }
    if store == "redis":
        env |= {"CASTELLAN_METERING__BACKEND": "redis", "CASTELLAN_METERING__REDIS_URL": redis.url}
    async with openai_api.serve() as (fake, url):
        env["CASTELLAN_LLM__UPSTREAM_URL"] = url
        fake.delay_seconds = 4.0  # the calls are in flight when the gateway dies
        with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
            token = gw.token(AGENT, ["analysts"])
            calls = [asyncio.create_task(chat(gw, token, i)) for i in range(IN_FLIGHT)]
            for _ in range(300):
                if (await usage(gw))["in_flight"] == IN_FLIGHT:
                    break
                await asyncio.sleep(0.05)
            held = await usage(gw)
            assert held["in_flight"] == IN_FLIGHT
            gw.process.kill()  # SIGKILL: no shutdown, no release
            gw.process.wait()
            cut_off = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(c, aiohttp.ClientError) for c in cut_off)
        fake.delay_seconds = 1.0
        restarted = time.monotonic()
        with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
            after = await usage(gw)
            assert (after["in_flight"], after["reserved_tokens"]) == (0, 0)  # released at start, not in 300 s
            token = gw.token(AGENT, ["analysts"])
            results = await asyncio.gather(*(chat(gw, token, 100 + i) for i in range(CONCURRENCY)))
            recovered = time.monotonic() - restarted
            assert [status for status, _ in results] == [200] * CONCURRENCY, results
            assert "meter_reconciled" in gw.log()
        print(
            f"\n{store}: held before the kill {held['in_flight']} calls / {held['reserved_tokens']} tokens; "
            f"after restart {after['in_flight']} / {after['reserved_tokens']}; "
            f"{CONCURRENCY} of {CONCURRENCY} concurrent calls admitted; "
            f"restart to all served {recovered:.1f}s (start-up included)"
        )
