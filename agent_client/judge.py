"""An LLM judge for answer quality (optional): any OpenAI-compatible endpoint, scores 1-5 mapped to 0-1."""

from __future__ import annotations

import re
from collections.abc import Sequence

from agent_client.models import OpenAICompatibleModel

PROMPT = (
    "You grade an assistant's answer. Question: {question}\nFacts a correct answer contains: {facts}\n"
    "Answer: {answer}\nReply with one line: 'score: N' where N is 1 (wrong or unhelpful) to 5 (correct, "
    "complete and concise), then one sentence of reasoning."
)


async def judge(model: OpenAICompatibleModel, question: str, answer: str, facts: Sequence[str]) -> float:
    prompt = PROMPT.format(question=question, facts="; ".join(facts) or "(none given)", answer=answer)
    reply = await model.complete([{"role": "user", "content": prompt}], [])
    found = re.search(r"score\s*[:=]\s*([1-5])", reply.content or "", re.IGNORECASE)
    return (int(found.group(1)) - 1) / 4 if found else 0.0
