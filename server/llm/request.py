"""A chat completion request as the gateway forwards it: validated, its completion capped, its cost bounded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.settings import LlmSettings

LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


class BadRequest(Exception):
    """The request is not a chat completion request we can forward (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The body to forward and what bounds it: `n` choices of at most `cap` completion tokens each."""

    body: dict[str, Any]
    model: str
    n: int
    cap: int
    stream: bool

    @property
    def max_output_tokens(self) -> int:
        """The largest completion the provider can produce for this request (all choices)."""
        return self.n * self.cap


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_chat(body: Any, settings: LlmSettings, default_output: int) -> ChatRequest:
    """Validate `body` and bound its completion. The cap is the smallest of what the client asked
    for (`max_tokens`, `max_completion_tokens`: a provider may honour either), the route's cap and
    the model's limit; it is written into every limit field the client sent (or `max_tokens` when
    it sent none, starting from `default_output`), so whichever field the provider honours, it
    cannot produce more than `n * cap` tokens. Raises `BadRequest`."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("a chat completion needs 'model' (string) and 'messages' (list)")
    if not isinstance(body.get("messages"), list):
        raise BadRequest("a chat completion needs 'model' (string) and 'messages' (list)")
    body = dict(body)
    model = body["model"]
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _positive_int(n):
        raise BadRequest("'n' must be a positive integer")
    if n > settings.max_choices:
        raise BadRequest(f"'n' is {n}; this route serves at most {settings.max_choices} choices per request")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    asked = {}
    for name in LIMIT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not _positive_int(value):
            raise BadRequest(f"'{name}' must be a positive integer")
        asked[name] = value
    bounds = [settings.max_completion_tokens]
    model_settings = settings.models.get(model)
    if model_settings is not None and model_settings.max_completion_tokens:
        bounds.append(model_settings.max_completion_tokens)
    if asked:
        cap = min([*asked.values(), *bounds])
        for name in asked:
            body[name] = cap
    else:
        cap = min([default_output, *bounds]) if default_output > 0 else min(bounds)
        body["max_tokens"] = cap
    return ChatRequest(body=body, model=model, n=n, cap=cap, stream=bool(stream))
