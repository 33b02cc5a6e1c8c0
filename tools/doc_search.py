"""`docs.search`: ranked search over the support documents table, kept in sync with its Delta versions."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.grants.source import Requirement, table_requirements
from server.registry import ToolOutput, ToolSpec
from tools.doc_index import DocIndex


class DocSearchTool:
    def __init__(self, index: DocIndex, sync_interval_seconds: float = 2.0) -> None:
        self._index = index
        self._interval = sync_interval_seconds
        self._synced_at = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="castellan-docs")
        modes = ["text", "vector"]
        self.spec = ToolSpec(
            name="docs.search",
            title="Search support documents",
            description=(
                f"Search the documents of {index.table}. mode 'text' (default) ranks by BM25 full-text relevance; "
                "'vector' by embedding similarity. Each hit has its source row id (doc_id) for attribution."
            ),
            securable="main.tools.docs_search",
            input_schema={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "minLength": 1, "maxLength": 2000},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
                    "mode": {"type": "string", "enum": modes, "default": "text"},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
            output_schema={
                "type": "object",
                "properties": {
                    "hits": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "doc_id": {"type": "string"},
                                "title": {"type": "string"},
                                "snippet": {"type": "string"},
                                "score": {"type": "number"},
                            },
                        },
                    },
                    "table": {"type": "string"},
                    "version": {"type": ["integer", "null"]},
                },
                "required": ["hits"],
            },
            annotations={"readOnlyHint": True, "idempotentHint": True, "openWorldHint": False},
        )

    @property
    def index(self) -> DocIndex:
        """The index searched (its documents are also served as resources: server/resources/own.py)."""
        return self._index

    def required_grants(self, arguments: Mapping[str, Any]) -> tuple[Requirement, ...]:
        return table_requirements([self._index.table])

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        loop = asyncio.get_running_loop()
        if time.monotonic() - self._synced_at > self._interval:
            await loop.run_in_executor(self._executor, self._index.sync)
            self._synced_at = time.monotonic()
        query, limit = str(arguments["query"]), int(arguments.get("limit", 5))
        search = self._index.search_vector if arguments.get("mode") == "vector" else self._index.search_text
        hits = await loop.run_in_executor(self._executor, search, query, limit)
        result = {
            "hits": [{"doc_id": h.doc_id, "title": h.title, "snippet": h.snippet, "score": h.score} for h in hits],
            "table": self._index.table,
            "version": self._index.stats.version,
        }
        return ToolOutput(text=json.dumps(result), structured=result)
