"""The Redis meter: the same counters and reservations as SQLite, in Redis, each admit and settle one
server-side script, so many gateway replicas share limits exactly."""

from __future__ import annotations

import time
from typing import Any

from server.call import Budget, RunInfo
from server.errors import BackendUnavailable, ConfigError
from server.identity import Identity
from server.metering import limits as L
from server.metering.meter import Admission, Usage, WindowUsage
from server.settings import Limits

# KEYS: 1-3 calls (minute, hour, day), 4-7 tokens (minute, hour, day, month), 8 reservation expiries
# (zset), 9 reservation sizes (hash), 10 run calls, 11 repeats.
# ARGV: now, call limits x3, token limits x4, estimate, reservation, expiry, concurrent, depth,
# max depth, max run calls, max repeats, call ttls x3, run ttl.
_ADMIT = """
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[9], id) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now) end
local in_flight = redis.call('ZCARD', KEYS[8])
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[9])) do reserved = reserved + tonumber(v) end
local calls = {}
for i = 1, 3 do
  calls[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[1 + i])
  if limit > 0 and calls[i] + 1 > limit then return {'rate', i, calls[i], limit} end
end
local concurrent = tonumber(ARGV[12])
if concurrent > 0 and in_flight + 1 > concurrent then return {'concurrency', in_flight, concurrent} end
local estimate = tonumber(ARGV[9])
local day_tokens = 0
for i = 1, 4 do
  local used = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  if i == 3 then day_tokens = used end
  local limit = tonumber(ARGV[4 + i])
  if limit > 0 and used + reserved + estimate > limit then return {'budget', i, used, reserved, estimate, limit} end
end
local depth, max_depth = tonumber(ARGV[13]), tonumber(ARGV[14])
if max_depth > 0 and depth > max_depth then return {'depth', depth, max_depth} end
local run_calls = tonumber(redis.call('GET', KEYS[10]) or '0') + 1
local max_run = tonumber(ARGV[15])
if max_run > 0 and run_calls > max_run then return {'run', max_run} end
local repeats = tonumber(redis.call('GET', KEYS[11]) or '0') + 1
local max_repeats = tonumber(ARGV[16])
if max_repeats > 0 and repeats > max_repeats then return {'repeat', repeats, max_repeats} end
for i = 1, 3 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[16 + i]))
end
redis.call('SET', KEYS[10], run_calls, 'EX', tonumber(ARGV[20]))
redis.call('SET', KEYS[11], repeats, 'EX', tonumber(ARGV[20]))
redis.call('ZADD', KEYS[8], tonumber(ARGV[11]), ARGV[10])
redis.call('HSET', KEYS[9], ARGV[10], estimate)
return {'ok', calls[1] + 1, run_calls, repeats, day_tokens}
"""

# KEYS: 1-4 tokens (minute, hour, day, month), 5 reservation expiries, 6 reservation sizes.
# ARGV: reservation, tokens, token ttls x4.
_SETTLE = """
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
for i = 1, 4 do
  redis.call('INCRBY', KEYS[i], tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2 + i]))
end
return 1
"""

_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_RUN_TTL_SECONDS = 86_400


def _keys(agent: str, now: float) -> dict[str, str]:
    tag = f"castellan:{{{agent}}}"
    keys = {f"calls:{w}": f"{tag}:calls:{w}:{L.bucket(w, now).bucket}" for w in L.CALL_WINDOWS}
    keys |= {f"tokens:{w}": f"{tag}:tokens:{w}:{L.bucket(w, now).bucket}" for w in L.TOKEN_WINDOWS}
    keys |= {"res:expiry": f"{tag}:reservations:expiry", "res:size": f"{tag}:reservations:size"}
    return keys


def _ttl(window: L.Window, now: float) -> int:
    return L.bucket(window, now).retry_after(now) + 60


class RedisMeter:
    """Shared limits for gateway replicas. Any Redis error (down, timeout) raises `BackendUnavailable`
    with the reason: the call is denied, never admitted unchecked."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError("metering.backend = 'redis' needs the extra: pip install 'castellan[redis]'") from None
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        self._admit = self._client.register_script(_ADMIT)
        self._settle = self._client.register_script(_SETTLE)
        self._release = self._client.register_script(_RELEASE)
        self._url = url

    async def _run(self, stage: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(stage, f"meter store unavailable (redis): {type(exc).__name__}") from exc

    async def admit(self, identity: Identity, run: RunInfo, admission: Admission) -> Budget:
        now = time.time()
        agent, limits = identity.agent_id, admission.limits
        k = _keys(agent, now)
        tag = f"castellan:{{{agent}}}"
        keys = [
            *(k[f"calls:{w}"] for w in L.CALL_WINDOWS),
            *(k[f"tokens:{w}"] for w in L.TOKEN_WINDOWS),
            k["res:expiry"],
            k["res:size"],
            f"{tag}:run:{run.run_id}",
            f"{tag}:repeat:{run.run_id}:{admission.call_key}",
        ]
        args = [
            now,
            *(L.call_limit(limits, w) for w in L.CALL_WINDOWS),
            *(L.token_limit(limits, w) for w in L.TOKEN_WINDOWS),
            admission.estimate,
            admission.reservation,
            now + admission.ttl,
            limits.concurrent_calls,
            run.depth,
            limits.max_depth,
            limits.max_run_calls,
            limits.max_repeats,
            *(_ttl(w, now) for w in L.CALL_WINDOWS),
            _RUN_TTL_SECONDS,
        ]
        verdict = await self._run("admit", self._admit, keys, args)
        kind, *values = verdict
        numbers = [int(v) for v in values]
        if kind == "rate":
            window = L.CALL_WINDOWS[numbers[0] - 1]
            raise L.rate_denied(window, numbers[1], numbers[2], L.bucket(window, now).retry_after(now))
        if kind == "concurrency":
            raise L.concurrency_denied(numbers[0], numbers[1])
        if kind == "budget":
            window = L.TOKEN_WINDOWS[numbers[0] - 1]
            raise L.budget_denied(
                window, numbers[1], numbers[2], numbers[3], numbers[4], L.bucket(window, now).retry_after(now)
            )
        if kind == "depth":
            raise L.depth_denied(numbers[0], numbers[1])
        if kind == "run":
            raise L.run_denied(run.run_id, numbers[0])
        if kind == "repeat":
            raise L.repeat_denied(run.run_id, numbers[0], numbers[1])
        calls_this_minute, run_calls, repeats, day_tokens = numbers
        return Budget(
            tokens_used=day_tokens,
            tokens_limit=limits.tokens_per_day,
            calls_this_minute=calls_this_minute,
            run_calls=run_calls,
            repeats=repeats,
            reservation=admission.reservation,
            reserved_tokens=admission.estimate,
        )

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> None:
        now = time.time()
        k = _keys(identity.agent_id, now)
        keys = [*(k[f"tokens:{w}"] for w in L.TOKEN_WINDOWS), k["res:expiry"], k["res:size"]]
        await self._run("charge", self._settle, keys, [reservation, tokens, *(_ttl(w, now) for w in L.TOKEN_WINDOWS)])

    async def release(self, identity: Identity, reservation: str) -> None:
        k = _keys(identity.agent_id, time.time())
        await self._run("charge", self._release, [k["res:expiry"], k["res:size"]], [reservation])

    async def usage(self, agent_id: str, limits: Limits) -> Usage:
        from redis.exceptions import RedisError

        now = time.time()
        k = _keys(agent_id, now)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for w in L.CALL_WINDOWS:
                    pipe.get(k[f"calls:{w}"])
                for w in L.TOKEN_WINDOWS:
                    pipe.get(k[f"tokens:{w}"])
                pipe.zcount(k["res:expiry"], now, "+inf")
                pipe.hvals(k["res:size"])
                values = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("usage", f"meter store unavailable (redis): {type(exc).__name__}") from exc
        calls = tuple(
            WindowUsage(w, int(v or 0), L.call_limit(limits, w), L.bucket(w, now).retry_after(now))
            for w, v in zip(L.CALL_WINDOWS, values[:3], strict=True)
        )
        tokens = tuple(
            WindowUsage(w, int(v or 0), L.token_limit(limits, w), L.bucket(w, now).retry_after(now))
            for w, v in zip(L.TOKEN_WINDOWS, values[3:7], strict=True)
        )
        return Usage(agent_id, calls, tokens, int(values[7]), sum(int(v) for v in values[8]), limits)

    async def check(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("admit", f"meter store unavailable (redis): {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()
