"""Unity Catalog functions on a Databricks workspace as tools: their definitions read from Unity
Catalog (`functions.get`), their calls run as `SELECT catalog.schema.fn(:p, ...)` through the SDK's
statement execution API on a SQL warehouse, with named, typed parameters (never string-built SQL)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

from server.registry import ToolOutput, ToolSpec

# Unity Catalog column types as JSON Schema.
_JSON_TYPES: dict[str, dict[str, Any]] = {
    "BYTE": {"type": "integer"}, "SHORT": {"type": "integer"}, "INT": {"type": "integer"},
    "LONG": {"type": "integer"}, "FLOAT": {"type": "number"}, "DOUBLE": {"type": "number"},
    "DECIMAL": {"type": "number"}, "BOOLEAN": {"type": "boolean"}, "STRING": {"type": "string"},
    "CHAR": {"type": "string"}, "DATE": {"type": "string", "format": "date"},
    "TIMESTAMP": {"type": "string", "format": "date-time"}, "TIMESTAMP_NTZ": {"type": "string"},
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value) or "STRING").upper()


class UcFunctionTool:
    """One Unity Catalog function. `client` is a `databricks.sdk.WorkspaceClient`."""

    def __init__(self, client: Any, info: Any, warehouse_id: str, timeout_seconds: float = 30.0) -> None:
        if not _NAME.match(info.full_name or ""):
            raise ValueError(f"not a function name: {info.full_name!r}")
        self._client = client
        self._warehouse = warehouse_id
        self._timeout = timeout_seconds
        self._params = sorted(
            (info.input_params.parameters if info.input_params and info.input_params.parameters else []),
            key=lambda p: p.position,
        )
        properties = {}
        required = []
        for param in self._params:
            schema = dict(_JSON_TYPES.get(_enum_value(param.type_name), {"type": "string"}))
            if param.comment:
                schema["description"] = param.comment
            properties[param.name] = schema
            if param.parameter_default is None:
                required.append(param.name)
        self._returns = _enum_value(info.data_type)
        self.spec = ToolSpec(
            name=info.full_name,
            title=info.name,
            description=info.comment or f"The Unity Catalog function {info.full_name}.",
            securable=info.full_name,
            input_schema={
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
            output_schema={"type": "object", "properties": {"result": _JSON_TYPES.get(self._returns, {})}},
            annotations={"readOnlyHint": True, "openWorldHint": False},
        )

    def _execute(self, arguments: Mapping[str, Any]) -> Any:
        from databricks.sdk.service.sql import StatementParameterListItem, StatementState

        given = [p for p in self._params if p.name in arguments]
        catalog, schema, name = self.spec.name.split(".")
        call = ", ".join(f"{p.name} => :{p.name}" for p in given)
        statement = f"SELECT `{catalog}`.`{schema}`.`{name}`({call}) AS result"
        parameters = [
            StatementParameterListItem(
                name=p.name,
                value=None if arguments[p.name] is None else str(arguments[p.name]).lower()
                if isinstance(arguments[p.name], bool) else str(arguments[p.name]),
                type=_enum_value(p.type_name),
            )
            for p in given
        ]  # fmt: skip
        response = self._client.statement_execution.execute_statement(
            statement=statement,
            warehouse_id=self._warehouse,
            parameters=parameters,
            wait_timeout=f"{max(5, min(50, int(self._timeout)))}s",
        )
        state = response.status.state if response.status else None
        if state != StatementState.SUCCEEDED:
            error = response.status.error.message if response.status and response.status.error else str(state)
            raise RuntimeError(f"statement {state.value if state else 'failed'}: {error}")
        rows = response.result.data_array if response.result and response.result.data_array else [[None]]
        return _typed(rows[0][0], self._returns)

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        try:
            result = await asyncio.wait_for(asyncio.to_thread(self._execute, dict(arguments)), self._timeout)
        except TimeoutError:
            return ToolOutput(text=f"{self.spec.name} timed out after {self._timeout:g} s", is_error=True)
        except Exception as exc:
            return ToolOutput(text=f"{self.spec.name} failed: {str(exc)[:500]}", is_error=True)
        structured = {"result": result}
        return ToolOutput(text=json.dumps(structured), structured=structured)


def _typed(value: str | None, type_name: str) -> Any:
    """Statement results come back as strings (JSON_ARRAY format): restore the declared type."""
    if value is None:
        return None
    if type_name in ("BYTE", "SHORT", "INT", "LONG"):
        return int(value)
    if type_name in ("FLOAT", "DOUBLE", "DECIMAL"):
        return float(value)
    if type_name == "BOOLEAN":
        return value.lower() == "true"
    return value


def uc_function_tools(client: Any, names: list[str], warehouse_id: str, timeout: float = 30.0) -> list[UcFunctionTool]:
    """Tools for `names`: full function names, or `catalog.schema` for every function in a schema."""
    tools = []
    for name in names:
        if name.count(".") == 1:
            catalog, schema = name.split(".")
            infos = list(client.functions.list(catalog_name=catalog, schema_name=schema))
            tools += [UcFunctionTool(client, client.functions.get(i.full_name), warehouse_id, timeout) for i in infos]
        else:
            tools.append(UcFunctionTool(client, client.functions.get(name), warehouse_id, timeout))
    return tools
