"""The agent's language model: any OpenAI-compatible chat endpoint, or a scripted stand-in.

`ScriptedModel` is not a language model: it replays a plan of tool calls from a file and fills an
answer template from the results. It makes the demo and the tests deterministic and offline.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Reply:
    """The model's turn: tool calls to make, or a final answer."""

    tool_calls: tuple[ToolCall, ...] = ()
    content: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


class ChatModel(Protocol):
    name: str

    async def complete(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> Reply: ...


class OpenAICompatibleModel:
    """Chat completions with function tools over HTTP (OpenAI, Databricks serving, the gateway's route)."""

    def __init__(self, base_url: str, api_key: str, model: str, timeout: float = 60.0) -> None:
        self.name = model
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def complete(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> Reply:
        body: dict[str, Any] = {"model": self.name, "messages": list(messages)}
        if tools:
            body["tools"] = list(tools)
            body["tool_choice"] = "auto"
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.post(self._url, json=body, headers=self._headers) as resp,
        ):
            payload = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"model endpoint answered {resp.status}: {json.dumps(payload)[:300]}")
        message = payload["choices"][0]["message"]
        calls = tuple(
            ToolCall(c["id"], c["function"]["name"], json.loads(c["function"].get("arguments") or "{}"))
            for c in message.get("tool_calls") or []
        )
        return Reply(tool_calls=calls, content=message.get("content"), usage=payload.get("usage") or {})


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

    async def complete(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> Reply:
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
