"""`sql.query`: governed, read-only SQL over the Delta tables, run by DuckDB out of the gateway's process.

The query is checked on its syntax tree (`tools.sql_guard`) during argument resolution, so a write,
a second statement, a file read or any function or relation outside the allow-list is refused before
anything runs; the tables it reads become `SELECT` requirements for the grants stage. A sandboxed
DuckDB worker (`tools.sql_workers`) then runs it in a fresh in-memory database with external access
off, only the referenced Delta tables registered, and memory, time, spill and thread limits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from server.grants.source import Requirement, table_requirements
from server.invoke import caller
from server.registry import ToolOutput, ToolSpec
from server.sandbox import SandboxMode, detect_mode
from tools.sql_guard import CheckedQuery, Rejected, check
from tools.sql_workers import QueryFailed, SqlLimits, SqlWorkers
from tools.tables import TableCatalog

MAX_ROWS = 1000
MAX_BYTES = 1_000_000


class SqlQueryTool:
    def __init__(
        self,
        tables: TableCatalog,
        spill_root: Path,
        limits: SqlLimits | None = None,
        mode: SandboxMode | None = None,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._tables = tables
        self._max_bytes = max_bytes
        self._workers = SqlWorkers(mode or detect_mode("auto"), tables.root, spill_root, limits or SqlLimits())
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
        identity = caller.get()
        who = identity.agent_id if identity is not None else ""
        tables = {f"__t{index}": self._tables.path(name) for index, name in enumerate(checked.tables)}
        try:
            result = await self._workers.query(who, checked.rewritten, tables, max_rows, self._max_bytes)
        except QueryFailed as exc:
            return ToolOutput(text=str(exc), is_error=True)
        return ToolOutput(text=json.dumps(result, separators=(",", ":")), structured=result)

    def close(self) -> None:
        self._workers.close()

    async def aclose(self) -> None:
        await self._workers.aclose()
