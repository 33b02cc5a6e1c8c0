"""The agent's connection to Castellan: the official `mcp` client with a bearer token, either era."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

# Admission denials that end a run: retrying would only be refused again (or make things worse).
STOPPING_LIMITS = {
    "loop depth": "loop",
    "loop detected": "loop",
    "nesting depth": "loop",
    "token budget": "budget",
    "rate limit": "rate_limit",
    "concurrency limit": "rate_limit",
}


@dataclass(frozen=True, slots=True)
class Observation:
    """What one tool call came back with, as the agent (and its model) sees it."""

    tool: str
    arguments: dict[str, Any]
    ok: bool
    text: str
    structured: dict[str, Any] | None = None
    decision: str = "allow"
    stage: str | None = None
    code: str | None = None
    reasons: tuple[str, ...] = ()
    latency_ms: float = 0.0

    @property
    def denied(self) -> bool:
        return self.decision != "allow"

    @property
    def stop(self) -> str | None:
        """ "loop", "budget" or "rate_limit" when the gateway's limits say this run must stop."""
        if self.stage != "admit":
            return None
        for prefix, kind in STOPPING_LIMITS.items():
            if any(r.startswith(prefix) for r in self.reasons):
                return kind
        return None

    def for_model(self) -> str:
        body: dict[str, Any] = {"tool": self.tool, "ok": self.ok, "text": self.text[:8000]}
        if self.structured is not None:
            body["structured"] = self.structured
        if self.denied:
            body.update(denied=True, stage=self.stage, reasons=list(self.reasons))
        return json.dumps(body, default=str)


@dataclass
class RunContext:
    """One agent run: its id (also the W3C trace id) goes with every call, with a fresh span id each."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def meta(self) -> dict[str, Any]:
        return {"io.castellan/runId": self.run_id, "traceparent": f"00-{self.run_id}-{secrets.token_hex(8)}-01"}


class GatewaySession:
    def __init__(self, client: Client) -> None:
        self._client = client

    async def tools(self) -> list[Any]:
        return list((await self._client.list_tools()).tools)

    async def call(self, tool: str, arguments: dict[str, Any], run: RunContext) -> Observation:
        started = time.perf_counter()
        result = await self._client.call_tool(tool, arguments, meta=run.meta())  # type: ignore[arg-type]
        latency = (time.perf_counter() - started) * 1000
        text = "\n".join(getattr(c, "text", "") for c in result.content if getattr(c, "text", None) is not None)
        structured = result.structured_content
        if result.is_error:
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("decision") in ("deny", "error"):
                return Observation(
                    tool, arguments, False, text, None, body["decision"], body.get("stage"), body.get("code"),
                    tuple(body.get("reasons") or ()), latency,
                )  # fmt: skip
            return Observation(tool, arguments, False, text, None, latency_ms=latency)
        return Observation(tool, arguments, True, text, structured, latency_ms=latency)


@contextlib.asynccontextmanager
async def connect(url: str, token: str, protocol: str = "auto") -> AsyncIterator[GatewaySession]:
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        Client(streamable_http_client(url, http_client=http), mode=protocol) as client,
    ):
        yield GatewaySession(client)
