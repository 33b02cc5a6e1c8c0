"""`clock.now`: the current UTC time (policy restricts it to some groups)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from server.registry import ToolOutput, ToolSpec


class ClockTool:
    spec = ToolSpec(
        name="clock.now",
        title="Current time",
        description="The current date and time in UTC, ISO 8601.",
        securable="main.tools.clock_now",
        input_schema={"type": "object", "properties": {}, "additionalProperties": False},
        output_schema={"type": "object", "properties": {"utc": {"type": "string"}}, "required": ["utc"]},
        annotations={"readOnlyHint": True, "openWorldHint": False},
    )

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        now = datetime.now(UTC).isoformat()
        return ToolOutput(text=now, structured={"utc": now})
