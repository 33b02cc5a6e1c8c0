"""Unity Catalog functions on a Databricks workspace as tools: their definitions read from Unity
Catalog (`functions.get`), their calls run as `SELECT catalog.schema.fn(:p, ...)` through the SDK's
statement execution API on a SQL warehouse, with named, typed parameters (never string-built SQL).
They run as the gateway, or, on behalf of the user, with the caller's own federated Databricks token
(server/grants/databricks_obo.py), so the workspace's grants and `current_user()` are the caller's."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any

from databricks.sdk.errors.platform import Unauthenticated

from server.errors import CastellanError
from server.grants.databricks_obo import OnBehalf, run_as
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
    """One Unity Catalog function. `client` is a `databricks.sdk.WorkspaceClient` (the gateway's own);
    with `on_behalf`, every call runs with the caller's federated token instead, and a caller without
    one gets an error result naming why (the statement is not sent)."""

    def __init__(
        self,
        client: Any,
        info: Any,
        warehouse_id: str,
        timeout_seconds: float = 30.0,
        on_behalf: OnBehalf | None = None,
    ) -> None:
        if not _NAME.match(info.full_name or ""):
            raise ValueError(f"not a function name: {info.full_name!r}")
        self._client = client
        self._on_behalf = on_behalf
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

    def upstream_input(self) -> dict[str, Any]:
        """`input.upstream`: the workspace, and whose credential the call carries there."""
        return {"name": "databricks", "credential": "on_behalf_of_user" if self._on_behalf else "gateway"}

    def _execute(self, client: Any, arguments: Mapping[str, Any]) -> Any:
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
        response = client.statement_execution.execute_statement(
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
        token = ""
        if self._on_behalf is None:
            work = asyncio.to_thread(self._execute, self._client, dict(arguments))
        else:
            try:
                token = await self._on_behalf.token()
            except CastellanError as exc:  # no Databricks token for this caller: nothing is sent
                return ToolOutput(text="; ".join(exc.reasons), is_error=True)
            work = run_as(token, self._execute, self._on_behalf.client, dict(arguments))
        try:
            result = await asyncio.wait_for(work, self._timeout)
        except Unauthenticated:
            if self._on_behalf is None:
                return ToolOutput(
                    text=f"{self.spec.name} failed: the workspace refused the gateway's credentials", is_error=True
                )
            return ToolOutput(text="; ".join(self._on_behalf.refused(token).reasons), is_error=True)
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


def uc_function_tools(
    client: Any, names: list[str], warehouse_id: str, timeout: float = 30.0, on_behalf: OnBehalf | None = None
) -> list[UcFunctionTool]:
    """Tools for `names`: full function names, or `catalog.schema` for every function in a schema.
    Definitions are read with `client` (the gateway's own: there is no caller at start-up)."""
    infos = []
    for name in names:
        if name.count(".") == 1:
            catalog, schema = name.split(".")
            listed = client.functions.list(catalog_name=catalog, schema_name=schema)
            infos += [client.functions.get(i.full_name) for i in listed]
        else:
            infos.append(client.functions.get(name))
    return [UcFunctionTool(client, info, warehouse_id, timeout, on_behalf) for info in infos]
