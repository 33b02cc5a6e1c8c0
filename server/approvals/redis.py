"""The Redis approval store (`approvals.backend = "redis"`): for replicas that share Redis (as they do
when metering is on Redis) but not a data directory. Each transition is one server-side script, so
`decide`, `use` and `expire` are atomic across replicas as they are in SQLite.

Keys (prefix `castellan:approvals:`): `req:<id>` a hash per request (kept `retention_seconds` past its
expiry), `all` a sorted set of ids by request time, `binding:<sha>` a sorted set of a binding's ids.
"""

from __future__ import annotations

import json
import time
from typing import Any

from server.approvals.request import Actor, ApprovalRequest, Status
from server.approvals.store import RETENTION_SECONDS, request_fields, request_from
from server.errors import BackendUnavailable, ConfigError

PREFIX = "castellan:approvals:"

# KEYS: 1 request hash. ARGV: 1 new status, 2 decided_by JSON, 3 now, 4 comment.
_DECIDE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'expires_at')) <= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'decided_by', ARGV[2], 'decided_at', ARGV[3], 'comment', ARGV[4])
return 1
"""
# KEYS: 1 request hash. ARGV: 1 from status, 2 to status, 3 used_by (or '').
_MOVE = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'used_by', ARGV[3]) end
return 1
"""


class RedisApprovals:
    """`ApprovalStore` in Redis. Any Redis error raises `BackendUnavailable` (the waiting call is denied)."""

    def __init__(self, url: str, *, timeout: float = 2.0, retention_seconds: float = RETENTION_SECONDS) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ConfigError("approvals.backend = 'redis' needs the extra: pip install 'castellan[redis]'") from None
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )
        self._decide = self._client.register_script(_DECIDE)
        self._move = self._client.register_script(_MOVE)
        self._retention = retention_seconds

    async def _do(self, work: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await work
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable("approval", f"approval queue unavailable ({type(exc).__name__}: {exc})") from None

    async def create(self, request: ApprovalRequest) -> None:
        key = f"{PREFIX}req:{request.id}"
        fields = {
            "status": request.status, "binding": request.binding, "call_id": request.call_id, "tool": request.tool,
            "requested_at": repr(request.requested_at), "expires_at": repr(request.expires_at),
            "request": json.dumps(request_fields(request)), "comment": "",
        }  # fmt: skip
        ttl_ms = max(int((request.expires_at + self._retention - time.time()) * 1000), 1)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(f"{PREFIX}all", {request.id: request.requested_at})
        pipe.zadd(f"{PREFIX}binding:{request.binding}", {request.id: request.requested_at})
        pipe.pexpire(f"{PREFIX}binding:{request.binding}", ttl_ms)
        await self._do(pipe.execute())

    async def get(self, request_id: str) -> ApprovalRequest | None:
        values = await self._do(self._client.hgetall(f"{PREFIX}req:{request_id}"))
        return _from_hash(request_id, values) if values else None

    async def _many(self, ids: list[str]) -> list[ApprovalRequest]:
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for rid in ids:
            pipe.hgetall(f"{PREFIX}req:{rid}")
        found = await self._do(pipe.execute())
        gone = [rid for rid, values in zip(ids, found, strict=True) if not values]
        if gone:  # past retention: drop them from the index too
            await self._do(self._client.zrem(f"{PREFIX}all", *gone))
        return [_from_hash(rid, values) for rid, values in zip(ids, found, strict=True) if values]

    async def open_for(self, binding: str, now: float) -> ApprovalRequest | None:
        ids = await self._do(self._client.zrange(f"{PREFIX}binding:{binding}", 0, -1))
        for request in await self._many(list(ids)):
            if request.status in ("pending", "approved") and request.expires_at > now:
                return request
        return None

    async def list(
        self, statuses: tuple[Status, ...] | None, now: float, limit: int, offset: int
    ) -> list[ApprovalRequest]:
        # Newest first, read in pages and filtered here (the index holds only what retention keeps).
        found: list[ApprovalRequest] = []
        skipped, start, page = 0, 0, max(limit + offset, 100)
        while len(found) < limit:
            ids = await self._do(self._client.zrevrange(f"{PREFIX}all", start, start + page - 1))
            if not ids:
                break
            start += len(ids)
            for request in await self._many(list(ids)):
                if statuses and request.effective_status(now) not in statuses:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                found.append(request)
                if len(found) == limit:
                    break
        return found

    async def decide(self, request_id: str, status: Status, by: Actor, comment: str, now: float) -> bool:
        keys = [f"{PREFIX}req:{request_id}"]
        done = await self._do(self._decide(keys=keys, args=[status, json.dumps(by.as_dict()), repr(now), comment]))
        return bool(int(done))

    async def use(self, request_id: str, call_id: str) -> bool:
        done = await self._do(self._move(keys=[f"{PREFIX}req:{request_id}"], args=["approved", "used", call_id]))
        return bool(int(done))

    async def expire(self, request_id: str) -> None:
        await self._do(self._move(keys=[f"{PREFIX}req:{request_id}"], args=["pending", "expired", ""]))

    async def check(self) -> None:
        await self._do(self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()


def _from_hash(request_id: str, values: dict[str, str]) -> ApprovalRequest:
    row = (
        request_id, values["binding"], values["status"], values["call_id"], values["tool"], "",
        float(values["requested_at"]), float(values["expires_at"]), values["request"],
        values.get("decided_by") or None,
        float(values["decided_at"]) if values.get("decided_at") else None,
        values.get("comment", ""), values.get("used_by") or None,
    )  # fmt: skip
    return request_from(row)
