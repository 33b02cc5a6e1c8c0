"""Chat completions through the gateway: limits before the upstream call, usage settled after, audited."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from server.audit.outbox import Outbox
from server.call import RunInfo
from server.errors import BackendUnavailable, Denied
from server.identity import Identity
from server.metering.limits import resolve_limits
from server.metering.meter import Admission, Meter
from server.metering.tokens import TokenCounter
from server.settings import LlmSettings, MeterSettings

log = structlog.get_logger("castellan.llm")
TOOL_NAME = "llm:chat.completions"


class BadRequest(Exception):
    """The request is not a chat completion request we can forward (HTTP 400)."""


class UpstreamFailed(Exception):
    """The upstream could not be reached or answered with an error (HTTP 502, or its own status)."""

    def __init__(self, message: str, status: int = 502, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class Prepared:
    """A call admitted and recorded, ready to forward."""

    identity: Identity
    call_id: str
    reservation: str
    body: dict[str, Any]
    prompt_tokens: int
    started: float


class LlmProxy:
    """Admits (reserving prompt tokens + `max_tokens`, which it sets when the client did not, so the
    provider cannot exceed the reservation), records the decision, forwards with the gateway's own key,
    and settles the provider's reported usage; the outcome is audited like a tool call's."""

    def __init__(
        self, settings: LlmSettings, metering: MeterSettings, meter: Meter, outbox: Outbox, counter: TokenCounter
    ) -> None:
        self._settings = settings
        self._metering = metering
        self._meter = meter
        self._outbox = outbox
        self._counter = counter
        self._redact = [re.compile(p) for p in settings.redact_patterns]
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._settings.timeout_seconds))
        return self._session

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self._settings.api_key_env, "")
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _payload(self, messages: Any) -> Any:
        text = json.dumps(messages)
        for pattern in self._redact:
            text = pattern.sub("[REDACTED]", text)
        return json.loads(text)

    async def prepare(self, identity: Identity, body: Any, run: RunInfo) -> Prepared:
        """Validate, admit and record. Raises `BadRequest`, `Denied` or `BackendUnavailable`."""
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("model"), str)
            or not isinstance(body.get("messages"), list)
        ):
            raise BadRequest("a chat completion needs 'model' (string) and 'messages' (list)")
        body = dict(body)
        prompt_tokens = self._counter.count(body["messages"])
        max_out = body.get("max_completion_tokens", body.get("max_tokens"))
        if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out <= 0:
            max_out = self._metering.reserve_output_tokens
            body["max_tokens"] = max_out
        call_id = uuid.uuid4().hex
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        admission = Admission(
            call_key=digest,
            limits=resolve_limits(self._metering, identity),
            estimate=prompt_tokens + max_out,
            reservation=call_id,
            ttl=self._metering.reservation_ttl_seconds + self._settings.timeout_seconds,
        )
        record = self._record(identity, call_id, run, body)
        try:
            await self._meter.admit(identity, run, admission)
        except (Denied, BackendUnavailable) as exc:
            await self._write(
                "decision", call_id, {**record, "decision": "deny", "stage": exc.stage, "reasons": list(exc.reasons)}
            )
            raise
        try:
            await self._outbox.write("decision", call_id, {**record, "decision": "allow", "stage": None, "reasons": []})
        except BackendUnavailable:
            await self._meter.release(identity, call_id)
            raise
        return Prepared(identity, call_id, call_id, body, prompt_tokens, time.time())

    def _record(self, identity: Identity, call_id: str, run: RunInfo, body: dict[str, Any]) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "model": body["model"],
            "messages": len(body["messages"]),
            "stream": bool(body.get("stream")),
            "max_tokens": body.get("max_tokens"),
        }
        if self._settings.log_payloads:
            arguments["payload"] = self._payload(body["messages"])
        return {
            "call_id": call_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": "llm",
            "agent_id": identity.agent_id,
            "subject": identity.subject,
            "groups": list(identity.groups),
            "tool": TOOL_NAME,
            "arguments": arguments,
            "run_id": run.run_id,
            "run_depth": run.depth,
            "traceparent": run.traceparent,
            "policy_version": None,
        }

    async def _write(self, kind: str, call_id: str, record: dict[str, Any]) -> None:
        try:
            await self._outbox.write(kind, call_id, record)  # type: ignore[arg-type]
        except BackendUnavailable as exc:
            log.error("audit_write_failed", call_id=call_id, error=str(exc))

    async def complete(self, prepared: Prepared) -> dict[str, Any]:
        """A non-streaming completion: the upstream's JSON, after settling its usage."""
        status, payload = 0, None
        try:
            async with self._client().post(
                f"{self._settings.upstream_url.rstrip('/')}/chat/completions",
                json=prepared.body,
                headers=self._headers(),
            ) as resp:
                status = resp.status
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            await self._finish(prepared, 0, f"upstream unavailable: {type(exc).__name__}")
            raise UpstreamFailed(f"upstream unavailable: {type(exc).__name__}") from exc
        if status != 200 or not isinstance(payload, dict):
            await self._finish(prepared, 0, f"upstream answered HTTP {status}")
            raise UpstreamFailed(f"upstream answered HTTP {status}", status if status >= 400 else 502, payload)
        usage = payload.get("usage") or {}
        total = usage.get("total_tokens")
        if not isinstance(total, int):
            text = "".join(str((c.get("message") or {}).get("content") or "") for c in payload.get("choices", []))
            total = prepared.prompt_tokens + self._counter.count(text)
        await self._finish(prepared, total, None, payload)
        return payload

    async def stream(self, prepared: Prepared) -> AsyncIterator[bytes]:
        """Server-sent events from the upstream, passed through as they come; usage settled at the end
        (the provider's final usage chunk, else the tokens counted in the deltas so far)."""
        body = {
            **prepared.body,
            "stream": True,
            "stream_options": {**(prepared.body.get("stream_options") or {}), "include_usage": True},
        }
        total: int | None = None
        generated: list[str] = []
        error: str | None = None
        try:
            async with self._client().post(
                f"{self._settings.upstream_url.rstrip('/')}/chat/completions", json=body, headers=self._headers()
            ) as resp:
                if resp.status != 200:
                    error = f"upstream answered HTTP {resp.status}"
                    message = json.dumps({"error": {"message": error, "type": "upstream_error"}})
                    yield f"data: {message}\n\n".encode()
                    return
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                        try:
                            chunk = json.loads(line[5:])
                        except ValueError:
                            chunk = {}
                        usage = chunk.get("usage") if isinstance(chunk, dict) else None
                        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                            total = usage["total_tokens"]
                        for choice in chunk.get("choices", []) if isinstance(chunk, dict) else []:
                            generated.append(str((choice.get("delta") or {}).get("content") or ""))
                    yield raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"upstream unavailable: {type(exc).__name__}"
            yield f"data: {json.dumps({'error': {'message': error, 'type': 'upstream_error'}})}\n\n".encode()
        finally:
            if total is None:
                total = prepared.prompt_tokens + self._counter.count("".join(generated)) if generated else 0
            await self._finish(prepared, total, error)

    async def _finish(
        self, prepared: Prepared, tokens: int, error: str | None, payload: Mapping[str, Any] | None = None
    ) -> None:
        try:
            await self._meter.settle(prepared.identity, prepared.reservation, tokens)
        except BackendUnavailable as exc:
            log.error("settle_failed", call_id=prepared.call_id, error=str(exc))
        outcome: dict[str, Any] = {
            "call_id": prepared.call_id,
            "is_error": error is not None,
            "error": error,
            "tokens": tokens,
            "latency_ms": round((time.time() - prepared.started) * 1000, 3),
        }
        if payload is not None and self._settings.log_payloads:
            outcome["result_preview"] = self._payload(payload.get("choices"))
        await self._write("outcome", prepared.call_id, outcome)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
