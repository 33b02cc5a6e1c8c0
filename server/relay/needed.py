"""The predicate "can anything be relayed to this caller": when it is false a call needs no back channel.

The edge's fast path (no SDK server machinery, no SSE) and the upstream's lean client are only taken
when it is false. It errs on the side of relaying: a false "no" would drop an upstream's sampling
request or progress that the agent asked for; a false "yes" only costs the slower path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROGRESS_TOKEN = "progressToken"
PROGRESS_TOKEN_PARSED = "progress_token"
"""The key the SDK's parsed `_meta` (a TypedDict) holds the progress token under."""
LOG_LEVEL_META_KEY = "io.modelcontextprotocol/logLevel"
CLIENT_CAPABILITIES_META_KEY = "io.modelcontextprotocol/clientCapabilities"
RELAYABLE_CAPABILITIES = ("sampling", "elicitation", "roots")
TASKS_EXTENSION = "io.modelcontextprotocol/tasks"


def relay_needed(
    capabilities: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None,
    *,
    log_level_set: bool = False,
    task_requested: bool = False,
) -> bool:
    """True when something an upstream raises during the call could reach this caller.

    `capabilities`: the client's declared capabilities (from `initialize`, or on 2026-07-28 the
    request's `_meta` envelope, which is also read from `meta` when `capabilities` is None).
    `meta`: the request's `_meta`. `log_level_set`: a 2025-era session ran `logging/setLevel`.
    `task_requested`: the request asks to run as a task.
    """
    meta = meta if isinstance(meta, Mapping) else {}
    if task_requested or log_level_set:
        return True
    if progress_token(meta) is not None or meta.get(LOG_LEVEL_META_KEY) is not None:
        return True
    if capabilities is None:
        declared = meta.get(CLIENT_CAPABILITIES_META_KEY)
        capabilities = declared if isinstance(declared, Mapping) else {}
    extensions = capabilities.get("extensions")
    if isinstance(extensions, Mapping) and TASKS_EXTENSION in extensions:
        return True  # the call may become a task (server/protocol/tasks.py)
    return any(capabilities.get(name) is not None for name in RELAYABLE_CAPABILITIES)


def progress_token(meta: Mapping[str, Any] | None) -> str | int | None:
    """The request's progress token, from the wire's `_meta` or the SDK's parsed one."""
    if not isinstance(meta, Mapping):
        return None
    token = meta.get(PROGRESS_TOKEN, meta.get(PROGRESS_TOKEN_PARSED))
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None
