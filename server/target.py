"""A governed target that is not a tool (a resource, a prompt): what the pipeline needs to decide on it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from server.grants.source import Requirement
from server.registry import ToolSpec

Completer = Callable[[str, str, dict[str, str]], Awaitable[dict[str, Any]]]
"""(argument name, value typed so far, arguments resolved already) → the MCP `completion` object."""

_SERVED_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def slug(text: str, limit: int = 64) -> str:
    """`text` as a catalog-name part: runs of other characters made `_`, lower case, bounded; a long
    or emptied name keeps a short hash of the original so two never meet."""
    base = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not base or len(base) > limit:
        return f"{base[: limit - 9]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}".lstrip("_")
    return base


class Target:
    """Stands where a tool stands in a `Call`. Its `spec` names the securable (and the name policy
    sees as `input.tool.name`); using it needs `USE CATALOG`, `USE SCHEMA` and `privilege` on the
    securable (`requirements`, which the grants stage asks for instead of a function's EXECUTE);
    `decision_input` adds what policy sees of it beside `input.tool`. Blocked while `blocked` says why
    (a quarantined definition): hidden from lists and denied at resolve."""

    def __init__(
        self,
        *,
        name: str,
        securable: str,
        privilege: tuple[str, str],
        upstream: str | None,
        title: str | None = None,
        description: str | None = None,
        input_schema: Mapping[str, Any] | None = None,
    ) -> None:
        self.served_name = name
        self._privilege = privilege
        self.blocked: str | None = None
        self.completer: Completer | None = None
        """Completes this target's arguments (a prompt's, a template's variables), when its source can."""
        self.spec = ToolSpec(
            name=name if _SERVED_NAME.fullmatch(name) else slug(name, 128),
            title=title,
            description=description or "",
            securable=securable,
            input_schema=input_schema or {"type": "object"},
            annotations={},
            upstream=upstream,
        )

    def requirements(self) -> tuple[Requirement, ...]:
        catalog, schema, _ = self.spec.securable.split(".", 2)
        privilege, securable_type = self._privilege
        return (
            Requirement("USE CATALOG", "CATALOG", catalog),
            Requirement("USE SCHEMA", "SCHEMA", f"{catalog}.{schema}"),
            Requirement(privilege, securable_type, self.spec.securable),
        )

    def blocked_reason(self) -> str | None:
        return self.blocked
