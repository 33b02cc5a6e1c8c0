"""The Redis meter: the same counters and reservations as SQLite, in Redis, each admit and settle one
server-side script, so many gateway replicas share limits exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog

from server.call import Budget, RunInfo
from server.errors import BackendUnavailable, ConfigError
from server.identity import Identity
from server.metering import limits as L
from server.metering.instances import Instance, dead
from server.metering.meter import Admission, Usage, WindowUsage
from server.settings import Limits

# KEYS: 1-3 calls (minute, hour, day), 4-7 tokens (minute, hour, day, month), 8 reservation expiries
# (zset), 9 reservation sizes (hash), 10 run calls, 11 repeats, 12 reservation owners (hash: which
# meter instance), 13 identical calls (zset, sliding window), 14 calls of this tool (zset, sliding).
# ARGV: now, call limits x3, token limits x4, estimate, reservation, expiry, concurrent, depth,
# max depth, max run calls, max repeats, call ttls x3, run ttl, instance, max identical, identical
# window, max per tool, tool window.
_ADMIT = """
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('HDEL', KEYS[9], id)
  redis.call('HDEL', KEYS[12], id)
end
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
local function window(key, seconds)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - seconds)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return redis.call('ZCARD', key), tonumber(oldest[2] or now)
end
-- Sliding windows are kept only while their limit is on (each then holds at most `limit` members).
local max_identical, identical_window = tonumber(ARGV[22]), tonumber(ARGV[23])
local identical = 0
if max_identical > 0 then
  local oldest
  identical, oldest = window(KEYS[13], identical_window)
  identical = identical + 1
  if identical > max_identical then
    return {'identical', identical, max_identical, identical_window, tostring(oldest)}
  end
end
local max_tool, tool_window = tonumber(ARGV[24]), tonumber(ARGV[25])
local tool_calls = 0
if max_tool > 0 then
  local oldest
  tool_calls, oldest = window(KEYS[14], tool_window)
  if tool_calls + 1 > max_tool then return {'tool', tool_calls, max_tool, tool_window, tostring(oldest)} end
  tool_calls = tool_calls + 1
end
for i = 1, 3 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[16 + i]))
end
redis.call('SET', KEYS[10], run_calls, 'EX', tonumber(ARGV[20]))
redis.call('SET', KEYS[11], repeats, 'EX', tonumber(ARGV[20]))
redis.call('ZADD', KEYS[8], tonumber(ARGV[11]), ARGV[10])
redis.call('HSET', KEYS[9], ARGV[10], estimate)
redis.call('HSET', KEYS[12], ARGV[10], ARGV[21])
if max_identical > 0 then
  redis.call('ZADD', KEYS[13], now, ARGV[10])
  redis.call('EXPIRE', KEYS[13], identical_window + 1)
end
if max_tool > 0 then
  redis.call('ZADD', KEYS[14], now, ARGV[10])
  redis.call('EXPIRE', KEYS[14], tool_window + 1)
end
return {'ok', calls[1] + 1, run_calls, repeats, day_tokens, identical, tool_calls}
"""

# KEYS: 1-4 tokens (minute, hour, day, month), 5 reservation expiries, 6 reservation sizes, 7 owners.
# ARGV: reservation, tokens, token ttls x4.
_SETTLE = """
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
for i = 1, 4 do
  redis.call('INCRBY', KEYS[i], tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2 + i]))
end
return 1
"""

_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# Every reservation of one agent held by one of the instances in ARGV (dead ones): released.
# KEYS: reservation expiries, sizes, owners. Returns {reservations, tokens} released.
_RELEASE_OWNED = """
local dead = {}
for _, id in ipairs(ARGV) do dead[id] = true end
local owners = redis.call('HGETALL', KEYS[3])
local count, tokens = 0, 0
for i = 1, #owners, 2 do
  local id, owner = owners[i], owners[i + 1]
  if dead[owner] then
    tokens = tokens + tonumber(redis.call('HGET', KEYS[2], id) or '0')
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    count = count + 1
  end
end
return {count, tokens}
"""
_INSTANCES = "castellan:meter:instances"

_RUN_TTL_SECONDS = 86_400


def _keys(agent: str, now: float) -> dict[str, str]:
    tag = f"castellan:{{{agent}}}"
    keys = {f"calls:{w}": f"{tag}:calls:{w}:{L.bucket(w, now).bucket}" for w in L.CALL_WINDOWS}
    keys |= {f"tokens:{w}": f"{tag}:tokens:{w}:{L.bucket(w, now).bucket}" for w in L.TOKEN_WINDOWS}
    keys |= {"res:expiry": f"{tag}:reservations:expiry", "res:size": f"{tag}:reservations:size"}
    keys["res:owner"] = f"{tag}:reservations:owner"
    return keys


def _alive_key(instance: str) -> str:
    return f"castellan:meter:instance:{{{instance}}}:alive"


def _agents_key(instance: str) -> str:
    return f"castellan:meter:instance:{{{instance}}}:agents"


def _ttl(window: L.Window, now: float) -> int:
    return L.bucket(window, now).retry_after(now) + 60


log = structlog.get_logger("castellan.metering")


class RedisMeter:
    """Shared limits for gateway replicas. Any Redis error (down, timeout) raises `BackendUnavailable`
    with the reason: the call is denied, never admitted unchecked.

    Each replica's meter is an instance with a heartbeat key (`instance_timeout` seconds to live,
    renewed every `heartbeat_seconds`) and a set of the agents it reserved for. Every live instance
    releases the reservations of instances whose heartbeat is gone, and at once those of a process
    it sees has died on its own machine (a restart after a kill).
    """

    def __init__(
        self, url: str, timeout: float = 1.0, *, heartbeat_seconds: float = 5.0, instance_timeout: float = 20.0
    ) -> None:
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
        self._release_owned = self._client.register_script(_RELEASE_OWNED)
        self._sadd = self._client.register_script("return redis.call('SADD', KEYS[1], ARGV[1])")
        self._url = url
        self.instance = Instance.this_process()
        self._heartbeat_seconds = heartbeat_seconds
        self._instance_timeout = instance_timeout
        self._heartbeat: asyncio.Task[None] | None = None
        self._agents: set[str] = set()
        self._registered = False

    async def start(self) -> None:
        """Register this instance, release what dead instances held, and keep the heartbeat."""
        try:
            await self.reconcile()
        except BackendUnavailable as exc:
            log.error("meter_reconcile_failed", error="; ".join(exc.reasons))
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                await self.reconcile()
            except BackendUnavailable as exc:
                log.warning("meter_heartbeat_failed", error="; ".join(exc.reasons))

    async def _alive(self) -> None:
        me = self.instance
        ttl = max(1, int(self._instance_timeout + 0.999))
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(_alive_key(me.id), repr(time.time()), ex=ttl)
            pipe.hset(_INSTANCES, me.id, json.dumps(me.as_dict()))
            if self._agents:
                pipe.sadd(_agents_key(me.id), *self._agents)
            await pipe.execute()
        self._registered = True

    async def reconcile(self) -> tuple[int, int]:
        """Renew this instance's heartbeat; release every reservation of dead instances. Returns
        (reservations, tokens) released. Idempotent: several replicas may reconcile at once."""
        from redis.exceptions import RedisError

        me = self.instance
        try:
            await self._alive()
            registered = await self._client.hgetall(_INSTANCES)
            count = tokens = 0
            gone = []
            for instance_id, info in registered.items():
                if instance_id == me.id:
                    continue
                beat = await self._client.get(_alive_key(instance_id))
                age = time.time() - float(beat) if beat else None
                try:
                    other = Instance.from_dict({**json.loads(info), "id": instance_id})
                except (ValueError, TypeError):
                    other = Instance(instance_id, "", "", 0, "")
                if not dead(other, me, age, self._instance_timeout):
                    continue
                n, t = await self._release_instance(instance_id)
                count, tokens = count + n, tokens + t
                gone.append(instance_id)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable("admit", f"meter store unavailable (redis): {type(exc).__name__}") from exc
        if gone:
            log.warning(
                "meter_reconciled",
                released_reservations=count,
                released_tokens=tokens,
                dead_instances=gone,
                instance=me.id,
            )
        return count, tokens

    async def _release_instance(self, instance_id: str) -> tuple[int, int]:
        count = tokens = 0
        for agent in await self._client.smembers(_agents_key(instance_id)):
            k = _keys(agent, time.time())
            n, t = await self._release_owned(keys=[k["res:expiry"], k["res:size"], k["res:owner"]], args=[instance_id])
            count, tokens = count + int(n), tokens + int(t)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.delete(_agents_key(instance_id), _alive_key(instance_id))
            pipe.hdel(_INSTANCES, instance_id)
            await pipe.execute()
        return count, tokens

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
            k["res:owner"],
            f"{tag}:recent:same:{admission.call_key}",
            f"{tag}:recent:tool:{admission.tool}",
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
            self.instance.id,
            limits.max_identical_calls,
            limits.identical_calls_window_seconds,
            limits.max_calls_per_tool,
            limits.tool_calls_window_seconds,
        ]
        if agent not in self._agents:  # before the reservation exists, so a crash cannot orphan it
            if not self._agents:
                await self.reconcile()  # registers this instance (and its heartbeat) first
            await self._run("admit", self._sadd, [_agents_key(self.instance.id)], [agent])
            self._agents.add(agent)
        verdict = await self._run("admit", self._admit, keys, args)
        kind, *values = verdict
        if kind in ("identical", "tool"):
            count, maximum, span = (int(v) for v in values[:3])
            retry = L.sliding_retry_after(float(values[3]), span, now)
            if kind == "identical":
                raise L.identical_denied(count, maximum, span, retry)
            raise L.tool_rate_denied(admission.tool, count, maximum, span, retry)
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
        calls_this_minute, run_calls, repeats, day_tokens, identical, tool_calls = numbers
        return Budget(
            tokens_used=day_tokens,
            tokens_limit=limits.tokens_per_day,
            calls_this_minute=calls_this_minute,
            run_calls=run_calls,
            repeats=repeats,
            reservation=admission.reservation,
            reserved_tokens=admission.estimate,
            identical_calls=identical,
            tool_calls=tool_calls,
            identical_calls_limit=limits.max_identical_calls,
            identical_calls_window_seconds=limits.identical_calls_window_seconds,
            tool_calls_limit=limits.max_calls_per_tool,
            tool_calls_window_seconds=limits.tool_calls_window_seconds,
        )

    async def settle(self, identity: Identity, reservation: str, tokens: int) -> None:
        now = time.time()
        k = _keys(identity.agent_id, now)
        keys = [*(k[f"tokens:{w}"] for w in L.TOKEN_WINDOWS), k["res:expiry"], k["res:size"], k["res:owner"]]
        await self._run("charge", self._settle, keys, [reservation, tokens, *(_ttl(w, now) for w in L.TOKEN_WINDOWS)])

    async def release(self, identity: Identity, reservation: str) -> None:
        k = _keys(identity.agent_id, time.time())
        await self._run("charge", self._release, [k["res:expiry"], k["res:size"], k["res:owner"]], [reservation])

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
        """Stop the heartbeat and release what this instance still holds (its process is leaving)."""
        from redis.exceptions import RedisError

        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._registered:
            self._registered = False
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._release_instance(self.instance.id)
        await self._client.aclose()
