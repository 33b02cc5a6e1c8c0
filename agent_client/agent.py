"""A ReAct-style agent: ask the model which tool to call, call it through the gateway, feed the result
back, and stop at an answer, the step limit, or a limit the gateway enforces (reported, not retried)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent_client.gateway import GatewaySession, Observation, RunContext
from agent_client.models import ChatModel

SYSTEM = (
    "You answer questions using the tools of a governed gateway. Call a tool when you need data; "
    "SQL tables are named catalog.schema.table. A tool result with denied=true was refused by policy: "
    "do not retry it the same way. Answer concisely, citing numbers and document ids you used."
)


@dataclass
class AgentResult:
    question: str
    answer: str | None
    stop_reason: str
    """"answer", "max_steps", "loop", "budget", "rate_limit", "repeated_denial" or "error"."""
    run_id: str
    steps: list[Observation] = field(default_factory=list)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [
            {"tool": s.tool, "arguments": s.arguments, "decision": s.decision, "ok": s.ok, "stage": s.stage,
             "reasons": list(s.reasons), "latency_ms": round(s.latency_ms, 2)}
            for s in self.steps
        ]  # fmt: skip


def function_name(tool: str) -> str:
    """OpenAI function names allow [A-Za-z0-9_-]: `sql.query` becomes `sql__query`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", tool.replace(".", "__"))[:64]


class Agent:
    def __init__(
        self,
        session: GatewaySession,
        model: ChatModel,
        max_steps: int = 8,
        on_step: Callable[[Observation], None] | None = None,
    ) -> None:
        self._session = session
        self._model = model
        self._max_steps = max_steps
        self._on_step = on_step

    async def run(self, question: str) -> AgentResult:
        run = RunContext()
        tools = await self._session.tools()
        by_function = {function_name(t.name): t.name for t in tools}
        schemas = [
            {
                "type": "function",
                "function": {
                    "name": function_name(t.name),
                    "description": (t.description or "")[:1000],
                    "parameters": t.input_schema or {"type": "object"},
                },
            }
            for t in tools
        ]
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        result = AgentResult(question, None, "max_steps", run.run_id)
        denied_before: set[str] = set()
        for _ in range(self._max_steps):
            reply = await self._model.complete(messages, schemas, run.run_id)
            if not reply.tool_calls:
                result.answer, result.stop_reason = reply.content or "", "answer"
                return result
            messages.append(
                {
                    "role": "assistant",
                    "content": reply.content,
                    "tool_calls": [
                        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _json(c.arguments)}}
                        for c in reply.tool_calls
                    ],
                }
            )
            for call in reply.tool_calls:
                if call.error is not None:  # unusable as given: tell the model, do not call anything
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": _json({"error": call.error})})
                    continue
                tool = by_function.get(call.name, call.name.replace("__", "."))
                key = f"{tool}:{_json(call.arguments)}"
                if key in denied_before:
                    result.stop_reason = "repeated_denial"
                    result.answer = f"Stopped: the model asked again for {tool} after it was denied."
                    return result
                observation = await self._session.call(tool, call.arguments, run)
                result.steps.append(observation)
                if self._on_step is not None:
                    self._on_step(observation)
                if observation.denied:
                    denied_before.add(key)
                if observation.stop is not None:
                    result.stop_reason = observation.stop
                    result.answer = f"Stopped by the gateway ({observation.stop}): {'; '.join(observation.reasons)}"
                    return result
                messages.append({"role": "tool", "tool_call_id": call.id, "content": observation.for_model()})
        result.answer = f"Stopped after {self._max_steps} steps without an answer."
        return result


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), sort_keys=True)
