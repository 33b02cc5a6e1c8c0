"""The OpenAI-compatible LLM route against a fake of the hosted API: metered, enforced, audited."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from server.testing import GatewayProcess, free_port, run_gateway
from tests.fakes import openai_api

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
UPSTREAM_KEY = "sk-gateway-own-upstream-key-0000"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[GatewayProcess, openai_api.FakeOpenAI]]:
    async with openai_api.serve() as (fake, url):
        env = {
            "CASTELLAN_LLM__UPSTREAM_URL": url,
            "CASTELLAN_LLM_API_KEY": UPSTREAM_KEY,
            "CASTELLAN_LLM__LOG_PAYLOADS": "true",
            "CASTELLAN_METERING__AGENTS": json.dumps({"thrifty-bot": {"tokens_per_day": 100}}),
        }
        with run_gateway(tmp_path / "gw", env) as gw:
            yield gw, fake


async def post(gw: GatewayProcess, token: str | None, body: object) -> tuple[int, dict[str, str], str]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gw.base_url}/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.text()


def chat(**extra: object) -> dict[str, object]:
    return {"model": "gpt-fake", "messages": [{"role": "user", "content": "What is the answer?"}], **extra}


async def usage_day(gw: GatewayProcess, agent: str) -> int:
    admin = gw.token("ops", scopes=["castellan:admin"])
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{gw.base_url}/admin/usage", params={"agent": agent}, headers={"authorization": f"Bearer {admin}"}
        ) as resp,
    ):
        report = await resp.json()
    return int(next(w["used"] for w in report["tokens"] if w["window"] == "day"))


async def test_a_completion_is_forwarded_with_the_gateways_key_and_metered(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, fake = setup
    token = gw.token("llm-bot", ["analysts"])
    status, _, text = await post(gw, token, chat())
    assert status == 200
    reply = json.loads(text)
    assert reply["choices"][0]["message"]["content"] == openai_api.REPLY
    headers, body = fake.requests[-1]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # never the agent's token
    assert token not in json.dumps(headers)
    assert body["max_tokens"] == 4096  # set by the gateway: the provider cannot exceed the reservation
    assert await usage_day(gw, "llm-bot") == 32  # the provider's reported usage


async def test_streaming_passes_chunks_through_and_settles_the_reported_usage(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, fake = setup
    status, headers, text = await post(gw, gw.token("stream-bot"), chat(stream=True))
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content.strip() == openai_api.REPLY
    assert text.rstrip().endswith("data: [DONE]")
    assert fake.requests[-1][1]["stream_options"] == {"include_usage": True}
    assert await usage_day(gw, "stream-bot") == 32


async def test_a_budget_too_small_is_refused_before_calling_upstream(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, fake = setup
    before = len(fake.requests)
    status, headers, text = await post(gw, gw.token("thrifty-bot"), chat(max_tokens=500))
    assert status == 429
    error = json.loads(text)["error"]
    assert error["type"] == "insufficient_quota"
    assert error["message"].startswith("token budget: 0 of 100 tokens per day used")
    assert int(headers["retry-after"]) > 0
    assert len(fake.requests) == before
    status, _, _ = await post(gw, gw.token("thrifty-bot"), chat(max_tokens=50))
    assert status == 200


async def test_llm_calls_are_audited_with_redacted_payloads(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, _ = setup
    secret = "sk-live-abcdefghijklmnopqrstuvwx"
    status, _, _ = await post(
        gw, gw.token("audited-bot"), chat(messages=[{"role": "user", "content": f"my key is {secret}"}])
    )
    assert status == 200
    rows = sqlite3.connect(gw.data_dir / "audit.db").execute("SELECT kind, record FROM outbox").fetchall()
    mine = [(k, json.loads(r)) for k, r in rows if "audited-bot" in r or k == "outcome"]
    decision = next(r for k, r in mine if k == "decision" and r.get("agent_id") == "audited-bot")
    assert (decision["tool"], decision["decision"]) == ("llm:chat.completions", "allow")
    assert secret not in json.dumps(decision)
    assert "[REDACTED]" in json.dumps(decision["arguments"]["payload"])
    outcome = next(r for k, r in mine if k == "outcome" and r["call_id"] == decision["call_id"])
    assert outcome["tokens"] == 32


async def test_bad_requests_are_clear_errors(setup: tuple[GatewayProcess, openai_api.FakeOpenAI]) -> None:
    gw, _ = setup
    assert (await post(gw, None, chat()))[0] == 401
    status, _, text = await post(gw, gw.token("x"), {"messages": "nope"})
    assert status == 400
    assert "needs 'model'" in json.loads(text)["error"]["message"]


async def test_an_unreachable_upstream_is_a_502_and_charges_nothing(tmp_path: Path) -> None:
    env = {"CASTELLAN_LLM__UPSTREAM_URL": f"http://127.0.0.1:{free_port()}/v1"}
    with run_gateway(tmp_path / "gw", env) as gw:
        status, _, text = await post(gw, gw.token("lonely-bot"), chat())
        assert status == 502
        assert "upstream unavailable" in json.loads(text)["error"]["message"]
        assert await usage_day(gw, "lonely-bot") == 0
