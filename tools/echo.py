"""`echo`: returns its text. The simplest governed tool (policy caps the text length)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.registry import ToolOutput, ToolSpec


class EchoTool:
    spec = ToolSpec(
        name="echo",
        title="Echo",
        description="Return the given text unchanged.",
        securable="main.tools.echo",
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string", "description": "Text to echo back."}},
            "required": ["text"],
            "additionalProperties": False,
        },
        output_schema={
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
        annotations={"readOnlyHint": True, "idempotentHint": True, "openWorldHint": False},
    )

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        text = str(arguments["text"])
        return ToolOutput(text=text, structured={"text": text})
