"""Which tools may run as tasks: what an upstream tool declares, read from its listing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
"""The extension's identifier; also the `_meta` key under which a tool declares its task support."""


def task_support_of(definition: Mapping[str, Any]) -> str:
    """A tool's task support, "forbidden" (the default), "optional" or "required": from its `_meta`
    (`{"io.modelcontextprotocol/tasks": {"taskSupport": ...}}`, as a 2026-07-28 listing carries it) or
    its 2025-era `execution.taskSupport`. Anything else reads as forbidden."""
    meta = definition.get("meta") or {}
    declared = meta.get(TASKS_EXTENSION) if isinstance(meta, Mapping) else None
    support = declared.get("taskSupport") if isinstance(declared, Mapping) else None
    if support is None:
        execution = definition.get("execution") or {}
        support = execution.get("taskSupport") if isinstance(execution, Mapping) else None
    return support if support in ("optional", "required") else "forbidden"
