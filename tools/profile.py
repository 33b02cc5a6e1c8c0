"""`demo.profile`: a customer record from the demo data (policy redacts the e-mail address)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.registry import ToolOutput, ToolSpec

_CUSTOMERS = {
    "c-001": {"id": "c-001", "name": "Ada Lovelace", "email": "ada@example.com", "tier": "gold"},
    "c-002": {"id": "c-002", "name": "Alan Turing", "email": "alan@example.com", "tier": "silver"},
    "c-003": {"id": "c-003", "name": "Grace Hopper", "email": "grace@example.com", "tier": "gold"},
}


class ProfileTool:
    spec = ToolSpec(
        name="demo.profile",
        title="Customer profile",
        description="Look up a demo customer by id (c-001 to c-003).",
        securable="main.tools.customer_profile",
        input_schema={
            "type": "object",
            "properties": {"customer_id": {"type": "string", "pattern": "^c-[0-9]{3}$"}},
            "required": ["customer_id"],
            "additionalProperties": False,
        },
        annotations={"readOnlyHint": True, "openWorldHint": False},
    )

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        record = _CUSTOMERS.get(str(arguments["customer_id"]))
        if record is None:
            return ToolOutput(text=f"no customer {arguments['customer_id']}", is_error=True)
        return ToolOutput(text=json.dumps(record), structured=dict(record))
