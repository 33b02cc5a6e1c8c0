"""Chat completions through the gateway: authenticated, admitted, granted and decided like a tool call,
reserved for the largest completion the request can produce, settled with the provider's usage, audited."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import structlog

from server.audit.outbox import Outbox
from server.audit.records import decision_record
from server.audit.redaction import Redactor
from server.audit.stage import DenialRecorder
from server.audit.traces import new_call_id
from server.call import Call, RunInfo
from server.errors import BackendUnavailable
from server.identity import Identity
from server.llm.model import TOOL_NAME, model_tool
from server.llm.request import BadRequest, ChatRequest, parse_chat
from server.metering.meter import Meter
from server.metering.retry import MeterRetries
from server.metering.stage import AdmitStage, ReleaseReservation
from server.metering.tokens import TokenCounter
from server.metrics import Metrics
from server.pipeline import Pipeline, Stage
from server.settings import LlmSettings, MeterSettings

log = structlog.get_logger("castellan.llm")
__all__ = ["TOOL_NAME", "BadRequest", "LlmProxy", "Prepared", "UpstreamFailed"]


class UpstreamFailed(Exception):
    """The upstream could not be reached or answered with an error (HTTP 502, or its own status)."""

    def __init__(self, message: str, status: int = 502, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class Prepared:
    """A call admitted and recorded, ready to forward (`call.error` set: refused, not to forward)."""

    call: Call
    request: ChatRequest
    started: float

    @property
    def identity(self) -> Identity:
        assert self.call.identity is not None
        return self.call.identity

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def reservation(self) -> str:
        return self.call.budget.reservation if self.call.budget else self.call.call_id

    @property
    def body(self) -> dict[str, Any]:
        return self.request.body

    @property
    def prompt_tokens(self) -> int:
        return self.call.tokens_in


class _Summarised:
    """What the audit keeps of a chat request: its shape, and the messages (redacted) only when
    `llm.log_payloads` is on. Wraps a recorder so refusals and allows are stored alike."""

    def __init__(self, settings: LlmSettings) -> None:
        self._settings = settings
        self._redact = [re.compile(p) for p in settings.redact_patterns]

    def payload(self, value: Any) -> Any:
        text = json.dumps(value)
        for pattern in self._redact:
            text = pattern.sub("[REDACTED]", text)
        return json.loads(text)

    def __call__(self, call: Call) -> Call:
        body = call.arguments
        messages = body.get("messages")
        arguments: dict[str, Any] = {
            "model": body.get("model"),
            "messages": len(messages) if isinstance(messages, list) else 0,
            "n": body.get("n", 1),
            "stream": bool(body.get("stream")),
            "max_tokens": body.get("max_tokens"),
            "max_completion_tokens": body.get("max_completion_tokens"),
        }
        if self._settings.log_payloads:
            arguments["payload"] = self.payload(messages)
        return replace(call, arguments=arguments)


class _RecordStage:
    """The LLM route's record stage: the allow decision committed (summarised) before forwarding."""

    name = "record"

    def __init__(self, outbox: Outbox, redactor: Redactor, summarise: _Summarised) -> None:
        self._outbox = outbox
        self._redactor = redactor
        self._summarise = summarise

    async def run(self, call: Call) -> Call:
        await self._outbox.write("decision", call.call_id, decision_record(self._summarise(call), self._redactor))
        return replace(call, recorded=True)


class LlmProxy:
    """Runs each request through authenticate, admit, grants and policy (`input.action == "llm"`, the
    model's securable as `input.tool.securable`), records the decision, forwards with the gateway's
    own key, and settles the provider's reported usage; the outcome is audited like a tool call's.

    Admission reserves the prompt plus `n` x the capped completion (`parse_chat`), so concurrent
    requests cannot together pass a budget whichever limit field the provider honours."""

    def __init__(
        self,
        settings: LlmSettings,
        metering: MeterSettings,
        meter: Meter,
        outbox: Outbox,
        counter: TokenCounter,
        *,
        authenticate: Stage,
        grants: Stage,
        policy: Stage,
        metrics: Metrics | None = None,
        retries: MeterRetries | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self._settings = settings
        self._metering = metering
        self._outbox = outbox
        self._counter = counter
        self._retries = retries if retries is not None else MeterRetries(meter)
        self._summarise = _Summarised(settings)
        redactor = redactor or Redactor()
        denials = DenialRecorder(outbox, redactor)

        async def record_denial(call: Call) -> None:
            await denials(self._summarise(call))

        # A reservation outlives the longest upstream call, so it cannot lapse while the model writes.
        ttl = metering.reservation_ttl_seconds + settings.timeout_seconds
        admit = AdmitStage(meter, metering, counter, output_tokens=_completion_tokens, ttl_seconds=ttl)
        self._pipeline = Pipeline(
            [authenticate, admit, grants, policy, _RecordStage(outbox, redactor, self._summarise)],
            metrics or Metrics(),
            on_stop=[ReleaseReservation(meter, self._retries, counter), record_denial],
        )
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

    async def prepare(self, identity: Identity, body: Any, run: RunInfo, request_id: str = "") -> Prepared:
        """Validate, admit, check grants and policy, record. Raises `BadRequest`; a refusal comes back
        as `prepared.call.error` (admission released, refusal audited)."""
        request = parse_chat(body, self._settings, self._metering.reserve_output_tokens)
        call = Call(
            tool_name=TOOL_NAME,
            arguments=request.body,
            identity=identity,
            run=run,
            action="llm",
            call_id=new_call_id(),
            request_id=request_id,
            tool=model_tool(self._settings, request.model),
        )
        call = await self._pipeline.run(call)
        return Prepared(call, request, time.time())

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
            await self._finish(prepared, None, f"upstream unavailable: {type(exc).__name__}")
            raise UpstreamFailed(f"upstream unavailable: {type(exc).__name__}") from exc
        if status != 200 or not isinstance(payload, dict):
            await self._finish(prepared, None, f"upstream answered HTTP {status}")
            raise UpstreamFailed(f"upstream answered HTTP {status}", status if status >= 400 else 502, payload)
        raw_usage, raw_choices = payload.get("usage"), payload.get("choices")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        choices: list[Any] = raw_choices if isinstance(raw_choices, list) else []
        text = "".join(str((c.get("message") or {}).get("content") or "") for c in choices if isinstance(c, Mapping))
        await self._finish(prepared, _used(usage, prepared.prompt_tokens, self._counter.count(text)), None, payload)
        return payload

    async def stream(self, prepared: Prepared) -> AsyncIterator[bytes]:
        """Server-sent events from the upstream, passed through as they come; usage settled at the end
        (the provider's final usage chunk, else the tokens counted in the deltas so far)."""
        body = {
            **prepared.body,
            "stream": True,
            "stream_options": {**(prepared.body.get("stream_options") or {}), "include_usage": True},
        }
        usage: dict[str, Any] = {}
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
                        if isinstance(chunk, dict):
                            if isinstance(chunk.get("usage"), dict):
                                usage = chunk["usage"]
                            for choice in chunk.get("choices") or []:
                                if isinstance(choice, Mapping):
                                    generated.append(str((choice.get("delta") or {}).get("content") or ""))
                    yield raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"upstream unavailable: {type(exc).__name__}"
            yield f"data: {json.dumps({'error': {'message': error, 'type': 'upstream_error'}})}\n\n".encode()
        finally:
            text = "".join(generated)
            used = _used(usage, prepared.prompt_tokens, self._counter.count(text)) if (usage or generated) else None
            # The client may have gone: finish (settle, audit) even if this generator is being cancelled.
            await asyncio.shield(self._finish(prepared, used, error))

    async def _finish(
        self,
        prepared: Prepared,
        used: tuple[int, int] | None,
        error: str | None,
        payload: Mapping[str, Any] | None = None,
    ) -> None:
        tokens_in, tokens_out = used if used is not None else (0, 0)
        tokens = tokens_in + tokens_out
        reserved = prepared.call.budget.reserved_tokens if prepared.call.budget else 0
        if reserved and tokens > reserved:
            log.warning("llm_usage_over_reservation", call_id=prepared.call_id, tokens=tokens, reserved=reserved)
        settled = await self._retries.settle(prepared.identity, prepared.reservation, tokens)
        outcome: dict[str, Any] = {
            "call_id": prepared.call_id,
            "is_error": error is not None,
            "error": error if settled else "; ".join(filter(None, [error, _owed(tokens)])),
            "tokens": tokens,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "latency_ms": round((time.time() - prepared.started) * 1000, 3),
        }
        if payload is not None and self._settings.log_payloads:
            outcome["result_preview"] = self._summarise.payload(payload.get("choices"))
        try:
            await self._outbox.write("outcome", prepared.call_id, outcome)
        except BackendUnavailable as exc:
            log.error("audit_write_failed", call_id=prepared.call_id, error=str(exc))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _completion_tokens(call: Call) -> int:
    """The admit stage's output reservation for a chat request: n x the capped completion."""
    body = call.arguments
    n = body.get("n") or 1
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return int(n) * int(cap)


def _used(usage: Mapping[str, Any], prompt_estimate: int, completion_count: int) -> tuple[int, int]:
    """(prompt, completion) tokens: the provider's usage when it reports it, else our own counts."""
    prompt, completion, total = (usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    if isinstance(total, int):
        return 0, total
    return prompt_estimate, completion_count


def _owed(tokens: int) -> str:
    return f"charging its {tokens} tokens failed (the meter store did not answer): owed, retried in the background"
