"""Token counting for tool arguments and results."""

from __future__ import annotations

import json
from typing import Any


def estimate_tokens(value: Any) -> int:
    """An estimate: one token per four characters of the JSON text, rounded up (OpenAI's rule of thumb).

    Used for tool payloads, where no model reports usage.
    """
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return (len(text) + 3) // 4
