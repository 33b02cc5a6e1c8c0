"""The agent's language model: any OpenAI-compatible chat endpoint, or a scripted stand-in.

`ScriptedModel` is not a language model: it replays a plan of tool calls from a file and fills an
answer template from the results. It makes the demo and the tests deterministic and offline.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]
    error: str | None = None
    """Why the model's call could not be used as given (e.g. its arguments are not a JSON object); the agent
    sends this back to the model as the tool's result instead of calling the tool."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The model's turn: tool calls to make, or a final answer."""

    tool_calls: tuple[ToolCall, ...] = ()
    content: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


class ModelError(Exception):
    """The model endpoint could not give a usable answer (after retries); the message says what to do."""


class ChatModel(Protocol):
    name: str

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], run_id: str | None = None
    ) -> Reply: ...


_RETRIED = frozenset({429, 500, 502, 503, 504})


class OpenAICompatibleModel:
    """Chat completions with function tools over HTTP (OpenAI, Databricks serving, the gateway's route).

    429 and 5xx answers (and connection failures) are retried with exponential backoff, honouring
    `Retry-After`; `run_id` goes with each request (`X-Castellan-Run-Id`), so the gateway's LLM route
    audits the model's turns in the same run as the agent's tool calls."""

    def __init__(
        self, base_url: str, api_key: str, model: str, timeout: float = 60.0, retries: int = 4, backoff: float = 0.5
    ) -> None:
        self.name = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], run_id: str | None = None
    ) -> Reply:
        body: dict[str, Any] = {"model": self.name, "messages": list(messages)}
        if tools:
            body["tools"] = list(tools)
            body["tool_choice"] = "auto"
        headers = {**self._headers, **({"x-castellan-run-id": run_id} if run_id else {})}
        payload = await self._post(body, headers)
        try:
            message = payload["choices"][0]["message"]
            calls = tuple(_tool_call(c) for c in message.get("tool_calls") or [])
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelError(f"the model endpoint answered without a message ({exc!r})") from None
        return Reply(tool_calls=calls, content=message.get("content"), usage=payload.get("usage") or {})

    async def _post(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
        last = ""
        for attempt in range(self._retries + 1):
            wait = self._backoff * 2**attempt
            try:
                async with (
                    aiohttp.ClientSession(timeout=self._timeout) as session,
                    session.post(self._url, json=body, headers=headers) as resp,
                ):
                    text = await resp.text()
                    if resp.status == 200:
                        try:
                            return json.loads(text)
                        except ValueError:
                            raise ModelError(f"the model endpoint answered 200 with no JSON: {text[:200]}") from None
                    last = f"{resp.status}: {_message(text)}"
                    if resp.status not in _RETRIED:
                        raise ModelError(f"the model endpoint ({self._url}) answered {last}")
                    wait = max(wait, _retry_after(resp.headers.get("retry-after")))
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < self._retries:
                await asyncio.sleep(min(wait, 30.0))
        raise ModelError(f"the model endpoint ({self._url}) failed {self._retries + 1} times, last: {last}")


def _tool_call(raw: Mapping[str, Any]) -> ToolCall:
    function = raw.get("function") or {}
    name, text = str(function.get("name", "")), function.get("arguments") or "{}"
    call_id = str(raw.get("id") or f"call_{name}")
    try:
        arguments = json.loads(text) if isinstance(text, str) else text
    except ValueError as exc:
        return ToolCall(call_id, name, {}, f"the arguments are not valid JSON ({exc}); send one JSON object")
    if not isinstance(arguments, dict):
        return ToolCall(call_id, name, {}, "the arguments must be one JSON object")
    return ToolCall(call_id, name, arguments)


def _message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
        return str(error.get("message") if isinstance(error, dict) else error or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


class ScriptedModel:
    """Replays `plan`: `{"steps": [{"tool": NAME, "arguments": {...}}, ...], "answer": TEMPLATE,
    "on_denied": TEMPLATE}`. Templates use Python format fields over the last tool result: `{result}`
    (its structured content, e.g. `{result[rows][0][0]}`), `{text}` (its text), `{reason}` (a denial's)."""

    name = "scripted"

    def __init__(self, plan: Mapping[str, Any]) -> None:
        self._steps = list(plan.get("steps") or [])
        self._answer = str(plan.get("answer", "{text}"))
        self._on_denied = str(plan.get("on_denied", "I could not do that: {reason}"))

    @classmethod
    def from_file(cls, path: Path, question: str | None = None) -> ScriptedModel:
        """A plan file: one plan, or `{"plans": {question: plan}}`."""
        document = json.loads(path.read_text())
        if "plans" in document:
            plans = document["plans"]
            if question not in plans:
                raise KeyError(f"no scripted plan for {question!r} in {path}")
            return cls(plans[question])
        return cls(document)

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], run_id: str | None = None
    ) -> Reply:
        results = [m for m in messages if m.get("role") == "tool"]
        last = json.loads(results[-1]["content"]) if results else {}
        if last.get("denied"):
            return Reply(content=_fill(self._on_denied, last))
        if len(results) < len(self._steps):
            step = self._steps[len(results)]
            return Reply(tool_calls=(ToolCall(f"call_{len(results)}", step["tool"], dict(step["arguments"])),))
        return Reply(content=_fill(self._answer, last))


def _fill(template: str, observation: Mapping[str, Any]) -> str:
    fields = {
        "result": observation.get("structured") or {},
        "text": observation.get("text", ""),
        "reason": "; ".join(observation.get("reasons") or []),
    }
    try:
        return string.Formatter().vformat(template, (), fields)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        return f"{template} [could not fill the template: {exc}]"
