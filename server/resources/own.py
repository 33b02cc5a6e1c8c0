"""Castellan's own resources: each Delta table's schema and a small sample, and the documents of the
search index, served from source `castellan` and governed like an upstream's resources.

- `castellan://tables/<catalog>.<schema>.<table>`: JSON with the table's version, its columns
  (name, type, nullable) and its first `SAMPLE_ROWS` rows. Securable `RESOURCE`
  `<catalog>.<schema>.<table>__resource`, beside the table (so `USE SCHEMA` on the table's schema
  reaches it); `READ` on it is not `SELECT` on the table: a team may let an agent see what a table
  holds without letting it query it. Sample rows are redacted by the decision's obligations like
  a tool result (`redact_fields` of the resource's entry in the policy data, by its served name).
- `castellan://docs/{doc_id}` (a template): one document of the search index, as markdown (its
  title, then its body). Securable `<docs table>__documents` (the documents, apart from the table's
  own schema and sample).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

from server.resources.target import ResourceDefinition, ResourceTarget

SOURCE = "castellan"
SAMPLE_ROWS = 5
TABLES = "castellan://tables/"
DOCS = "castellan://docs/"


def securable_of(table: str) -> str:
    return f"{table}__resource"


def table_resource(tables: Any, name: str) -> ResourceTarget:
    """`tables`: the `TableCatalog` the table `name` is in."""
    uri = f"{TABLES}{name}"

    async def read(asked: str) -> list[dict[str, Any]]:
        body = await asyncio.to_thread(_describe, tables, name)
        return [{"uri": asked, "mimeType": "application/json", "text": json.dumps(body, default=str)}]

    definition = ResourceDefinition(
        uri=uri,
        name=f"table.{name}",
        title=f"Table {name}",
        description=f"The columns of Delta table {name} and its first {SAMPLE_ROWS} rows.",
        mime_type="application/json",
    )
    return ResourceTarget(definition, name=f"castellan.table.{name}", securable=securable_of(name), reader=read)


def _describe(tables: Any, name: str) -> dict[str, Any]:
    delta = tables.open(name)
    dataset = delta.to_pyarrow_dataset()
    columns = [{"name": f.name, "type": str(f.type), "nullable": bool(f.nullable)} for f in dataset.schema]
    sample = dataset.head(SAMPLE_ROWS).to_pylist()
    return {"table": name, "version": int(delta.version()), "columns": columns, "sample": sample}


def docs_template(index: Any) -> ResourceTarget:
    """`index`: the search index (`tools.doc_index.DocIndex`) whose documents are served."""

    async def read(asked: str) -> list[dict[str, Any]]:
        doc_id = asked.removeprefix(DOCS)
        await asyncio.to_thread(index.sync)
        found = await asyncio.to_thread(index.document, doc_id)
        if found is None:
            raise MCPError(
                code=types.INVALID_PARAMS, message=f"no document {doc_id!r} in the index", data={"uri": asked}
            )
        title, body = found
        return [{"uri": asked, "mimeType": "text/markdown", "text": f"# {title}\n\n{body}"}]

    definition = ResourceDefinition(
        uri=f"{DOCS}{{doc_id}}",
        name="docs",
        template=True,
        title=f"Documents of {index.table}",
        description=f"One document of the search index over {index.table}, by its id (doc.search finds them).",
        mime_type="text/markdown",
    )
    return ResourceTarget(definition, name="castellan.docs", securable=f"{index.table}__documents", reader=read)


def own_resources(tables: Any, index: Any | None) -> list[ResourceTarget]:
    """The gateway's own resources: one per Delta table, and the documents template when there is an index."""
    targets = [table_resource(tables, name) for name in tables.names()]
    if index is not None:
        targets.append(docs_template(index))
    return targets
