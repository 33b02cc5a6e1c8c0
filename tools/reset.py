"""`demo.reset`: a destructive demo tool that only admins may call (grants and policy both say so)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.registry import ToolOutput, ToolSpec


class ResetTool:
    spec = ToolSpec(
        name="demo.reset",
        title="Reset demo data",
        description="Reset the demo data set. Destructive.",
        securable="main.admin.reset_demo",
        input_schema={"type": "object", "properties": {}, "additionalProperties": False},
        annotations={"destructiveHint": True, "readOnlyHint": False},
    )

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        return ToolOutput(text="demo data reset", structured={"reset": True})
