"""`sql.query`: governed, read-only SQL over the Delta tables, run by DuckDB.

The query is checked on its syntax tree (`tools.sql_guard`) during argument resolution, so a write,
a second statement or a file read is refused before anything runs; the tables it reads become
`SELECT` requirements for the grants stage. DuckDB then runs it in a fresh in-memory database with
file access disabled and only the referenced Delta tables registered.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from server.grants.source import Requirement, table_requirements
from server.registry import ToolOutput, ToolSpec
from tools.sql_guard import CheckedQuery, Rejected, check
from tools.tables import TableCatalog

MAX_ROWS = 1000
MAX_BYTES = 1_000_000


class SqlQueryTool:
    def __init__(self, tables: TableCatalog, timeout_seconds: float = 20.0, max_bytes: int = MAX_BYTES) -> None:
        self._tables = tables
        self._timeout = timeout_seconds
        self._max_bytes = max_bytes
        self._check = lru_cache(maxsize=512)(self._check_uncached)
        self.spec = ToolSpec(
            name="sql.query",
            title="SQL query",
            description=(
                "Run one read-only SQL query (DuckDB dialect) over the Delta tables, named catalog.schema.table. "
                f"Returns typed columns and rows (at most max_rows, default 100, up to {MAX_ROWS}). "
                "Tables: " + (", ".join(tables.names()) or "none yet")
            ),
            securable="main.tools.sql_query",
            input_schema={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "minLength": 1, "maxLength": 20_000},
                    "max_rows": {"type": "integer", "minimum": 1, "maximum": MAX_ROWS, "default": 100},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    "columns": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
                        },
                    },
                    "rows": {"type": "array", "items": {"type": "array"}},
                    "row_count": {"type": "integer"},
                    "truncated": {"type": "boolean"},
                },
                "required": ["columns", "rows", "row_count", "truncated"],
            },
            annotations={"readOnlyHint": True, "idempotentHint": True, "openWorldHint": False},
        )

    def _check_uncached(self, sql: str) -> CheckedQuery:
        return check(sql, self._tables.exists)

    def check_arguments(self, arguments: Mapping[str, Any]) -> str | None:
        """Why the query is refused (read-only, one statement, known tables), or None."""
        try:
            self._check(str(arguments["query"]))
        except Rejected as exc:
            return f"query refused: {exc}"
        return None

    def required_grants(self, arguments: Mapping[str, Any]) -> tuple[Requirement, ...]:
        """SELECT on every table the query reads (from its syntax tree, never the agent's word)."""
        return table_requirements(self._check(str(arguments["query"])).tables)

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        checked = self._check(str(arguments["query"]))
        max_rows = int(arguments.get("max_rows", 100))
        import duckdb

        con = duckdb.connect(
            ":memory:",
            config={
                "enable_external_access": False,
                "autoload_known_extensions": False,
                "autoinstall_known_extensions": False,
                "threads": 2,
                "max_memory": "1GB",
            },
        )
        try:
            task = asyncio.get_running_loop().run_in_executor(None, self._run, con, checked, max_rows)
            try:
                result = await asyncio.wait_for(asyncio.shield(task), timeout=self._timeout)
            except TimeoutError:
                con.interrupt()
                await asyncio.gather(task, return_exceptions=True)
                return ToolOutput(text=f"query timed out after {self._timeout:g} s", is_error=True)
            except duckdb.Error as exc:
                return ToolOutput(text=f"query failed: {str(exc).splitlines()[0][:500]}", is_error=True)
        finally:
            con.close()
        return ToolOutput(text=json.dumps(result, separators=(",", ":")), structured=result)

    def _run(self, con: Any, checked: CheckedQuery, max_rows: int) -> dict[str, Any]:
        for index, name in enumerate(checked.tables):
            con.register(f"__t{index}", self._tables.open(name).to_pyarrow_dataset())
        con.execute("SET lock_configuration = true")
        cursor = con.execute(checked.rewritten)
        columns = [{"name": d[0], "type": str(d[1])} for d in cursor.description or []]
        rows: list[list[Any]] = []
        size, truncated = 2, False
        for row in cursor.fetchmany(max_rows + 1):
            if len(rows) == max_rows:
                truncated = True
                break
            values = [_json_value(v) for v in row]
            size += len(json.dumps(values, separators=(",", ":"))) + 1
            if size > self._max_bytes:
                truncated = True
                break
            rows.append(values)
        return {"columns": columns, "rows": rows, "row_count": len(rows), "truncated": truncated}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)
