"""The OpenAI-compatible LLM route against a fake of the hosted API: metered, enforced, audited."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from server.settings import REPO_ROOT
from tests.fakes import openai_api
from tests.gateway_process import GatewayProcess, free_port, run_gateway
from tests.opa import run_opa
from tests.redis_server import RedisProcess, run_redis

pytestmark = [pytest.mark.anyio, pytest.mark.integration]
UPSTREAM_KEY = "sk-gateway-own-upstream-key-0000"
MODELS = json.dumps({"gpt-fake": {}})  # main.llm.gpt-fake in the catalog; demo analysts may use main.llm
ANALYSTS = ["analysts"]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[GatewayProcess, openai_api.FakeOpenAI]]:
    async with openai_api.serve() as (fake, url):
        env = {
            "CASTELLAN_LLM__UPSTREAM_URL": url,
            "CASTELLAN_LLM_API_KEY": UPSTREAM_KEY,
            "CASTELLAN_LLM__LOG_PAYLOADS": "true",
            "CASTELLAN_METERING__AGENTS": json.dumps({"thrifty-bot": {"tokens_per_day": 100}}),
            "CASTELLAN_LLM__MODELS": MODELS,
        }
        with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
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
    status, headers, text = await post(gw, gw.token("stream-bot", ANALYSTS), chat(stream=True))
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
    status, headers, text = await post(gw, gw.token("thrifty-bot", ANALYSTS), chat(max_tokens=500))
    assert status == 429
    error = json.loads(text)["error"]
    assert error["type"] == "insufficient_quota"
    assert error["message"].startswith("token budget: 0 of 100 tokens per day used")
    assert int(headers["retry-after"]) > 0
    assert len(fake.requests) == before
    status, _, _ = await post(gw, gw.token("thrifty-bot", ANALYSTS), chat(max_tokens=50))
    assert status == 200


async def test_llm_calls_are_audited_with_redacted_payloads(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, _ = setup
    secret = "sk-live-abcdefghijklmnopqrstuvwx"
    status, _, _ = await post(
        gw, gw.token("audited-bot", ANALYSTS), chat(messages=[{"role": "user", "content": f"my key is {secret}"}])
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
    status, _, text = await post(gw, gw.token("x", ANALYSTS), {"messages": "nope"})
    assert status == 400
    assert "needs 'model'" in json.loads(text)["error"]["message"]


async def test_an_unreachable_upstream_is_a_502_and_charges_nothing(tmp_path: Path) -> None:
    env = {"CASTELLAN_LLM__UPSTREAM_URL": f"http://127.0.0.1:{free_port()}/v1", "CASTELLAN_LLM__MODELS": MODELS}
    with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
        status, _, text = await post(gw, gw.token("lonely-bot", ANALYSTS), chat())
        assert status == 502
        assert "upstream unavailable" in json.loads(text)["error"]["message"]
        assert await usage_day(gw, "lonely-bot") == 0


# Budgets hold: the reservation covers the largest completion a request can produce.


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    with run_redis() as server:
        yield server


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_concurrent_requests_with_n_or_two_limits_never_pass_a_10000_token_budget(
    tmp_path: Path, redis: RedisProcess, store: str
) -> None:
    async with openai_api.serve() as (fake, url):
        fake.fill = True  # writes until stopped, honouring max_tokens over max_completion_tokens
        fake.delay_seconds = 0.3  # so the requests are in flight together
        env = {
            "CASTELLAN_LLM__UPSTREAM_URL": url,
            "CASTELLAN_LLM__MODELS": MODELS,
            "CASTELLAN_METERING__AGENTS": json.dumps({"spender": {"tokens_per_day": 10_000}}),
        }
        if store == "redis":
            env |= {"CASTELLAN_METERING__BACKEND": "redis", "CASTELLAN_METERING__REDIS_URL": redis.url}
        with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
            token = gw.token("spender", ANALYSTS)
            shapes: list[dict[str, object]] = [
                {"n": 8, "max_tokens": 150},  # 8 choices of 150: 1,200 completion tokens
                {"max_tokens": 3000, "max_completion_tokens": 100},  # the provider honours the larger one
                {"n": 4, "max_completion_tokens": 300, "stream": True},
                {"n": 2},  # no limit: the gateway sets one
            ]

            async def one(i: int) -> int:
                msg = [{"role": "user", "content": f"question {i}"}]
                status, _, text = await post(gw, token, chat(messages=msg, **shapes[i % len(shapes)]))
                if status == 429:
                    assert json.loads(text)["error"]["message"].startswith("token budget: ")
                else:
                    assert status == 200, text
                return status

            statuses = [s for wave in range(3) for s in await asyncio.gather(*(one(wave * 16 + i) for i in range(16)))]
            charged = await usage_day(gw, "spender")
        assert statuses.count(200) > 0
        assert statuses.count(429) > 0
        assert charged == fake.produced  # every token the provider reported is charged...
        assert charged <= 10_000  # ...and together they never pass the budget
        bodies = [body for _, body in fake.requests]
        two_limits = [b for b in bodies if "max_completion_tokens" in b and "max_tokens" in b]
        assert two_limits
        assert all(b["max_tokens"] == b["max_completion_tokens"] == 100 for b in two_limits)


async def test_a_request_is_capped_and_bounded_before_it_leaves(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, fake = setup
    token = gw.token("capped-bot", ANALYSTS)
    status, _, _ = await post(gw, token, chat(max_tokens=10**6))
    assert status == 200
    assert fake.requests[-1][1]["max_tokens"] == 16_384  # the route's cap (llm.max_completion_tokens)
    status, _, text = await post(gw, token, chat(n=17))
    assert (status, json.loads(text)["error"]["message"]) == (
        400,
        "'n' is 17; this route serves at most 16 choices per request",
    )
    for bad in ({"n": 0}, {"max_tokens": "100"}, {"max_completion_tokens": -1}, {"stream": "yes"}):
        status, _, text = await post(gw, token, chat(**bad))
        assert status == 400, (bad, text)


# Grants and policy decide the LLM route like a tool call.


async def test_the_model_is_a_securable_the_caller_needs_execute_on(
    setup: tuple[GatewayProcess, openai_api.FakeOpenAI],
) -> None:
    gw, fake = setup
    before = len(fake.requests)
    status, _, text = await post(gw, gw.token("outsider-bot"), chat())  # no group, no grant
    assert status == 403
    error = json.loads(text)["error"]
    assert error["type"] == "permission_denied"
    assert error["message"].split("; ") == [
        "grants: missing privilege USE CATALOG on main",
        "missing privilege USE SCHEMA on main.llm",
        "missing privilege EXECUTE on main.llm.gpt-fake",
    ]
    status, _, text = await post(gw, gw.token("analyst-bot", ANALYSTS), chat(model="gpt-unlisted"))
    assert status == 403  # a model not in llm.models is not in the catalog: nothing is held on it
    assert "missing privilege EXECUTE on main.llm.gpt-unlisted" in json.loads(text)["error"]["message"]
    assert len(fake.requests) == before
    rows = sqlite3.connect(gw.data_dir / "audit.db").execute("SELECT kind, record FROM outbox").fetchall()
    denied = [json.loads(r) for k, r in rows if k == "decision" and "outsider-bot" in r]
    assert [(d["action"], d["decision"], d["stage"], d["securable"]) for d in denied] == [
        ("llm", "deny", "grants", "main.llm.gpt-fake")
    ]
    assert await usage_day(gw, "outsider-bot") == 0  # its admission was released


LLM_RULE = """package castellan.gateway

import rego.v1

deny contains sprintf("model %s is for admins", [input.arguments.model]) if {
	input.action == "llm"
	input.tool.securable == "main.llm.gpt-fake-large"
	not "admins" in input.identity.groups
}

deny contains "at most 2 choices" if {
	input.action == "llm"
	input.arguments.n > 2
}
"""


@pytest.mark.parametrize("engine", ["embedded", "opa"])
async def test_policy_decides_llm_calls_with_action_llm(tmp_path: Path, engine: str) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    (policies / "castellan" / "llm_rules.rego").write_text(LLM_RULE)
    models = json.dumps({"gpt-fake": {}, "gpt-fake-large": {}})
    with contextlib.ExitStack() as stack:
        env = {"CASTELLAN_POLICY__PATH": str(policies), "CASTELLAN_POLICY__ENGINE": engine}
        if engine == "opa":
            opa = stack.enter_context(run_opa())
            env["CASTELLAN_POLICY__OPA_URL"] = opa.url
        async with openai_api.serve() as (fake, url):
            env |= {"CASTELLAN_LLM__UPSTREAM_URL": url, "CASTELLAN_LLM__MODELS": models}
            with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
                analyst, admin = gw.token("analyst-bot", ANALYSTS), gw.token("admin-bot", ["admins"])
                assert (await post(gw, analyst, chat()))[0] == 200
                status, _, text = await post(gw, analyst, chat(model="gpt-fake-large"))
                assert (status, json.loads(text)["error"]["message"]) == (
                    403,
                    "policy: model gpt-fake-large is for admins",
                )
                assert (await post(gw, admin, chat(model="gpt-fake-large")))[0] == 200
                status, _, text = await post(gw, analyst, chat(n=3))
                assert (status, json.loads(text)["error"]["message"]) == (403, "policy: at most 2 choices")
                assert [b["model"] for _, b in fake.requests] == ["gpt-fake", "gpt-fake-large"]


async def test_a_chunked_body_is_held_to_the_same_size_limit(tmp_path: Path) -> None:
    async with openai_api.serve() as (fake, url):
        env = {
            "CASTELLAN_LLM__UPSTREAM_URL": url,
            "CASTELLAN_LLM__MODELS": MODELS,
            "CASTELLAN_SERVER__MAX_BODY_BYTES": "4096",
        }
        with run_gateway(tmp_path / "gw", env, timeout=90) as gw:
            token = gw.token("chunky-bot", ANALYSTS)
            big = json.dumps(chat(messages=[{"role": "user", "content": "y" * 8000}])).encode()

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(big), 1000):
                    yield big[i : i + 1000]

            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{gw.base_url}/v1/chat/completions", data=chunks(), headers=headers) as resp:
                    assert resp.status == 413
                small = json.dumps(chat()).encode()

                async def small_chunks() -> AsyncIterator[bytes]:
                    yield small[:10]
                    yield small[10:]

                async with s.post(f"{gw.base_url}/v1/chat/completions", data=small_chunks(), headers=headers) as resp:
                    assert resp.status == 200
            assert [b["messages"][0]["content"] for _, b in fake.requests] == ["What is the answer?"]
