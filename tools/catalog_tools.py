"""The tools a gateway serves from its settings: demo tools, SQL over the Delta tables, document
search, catalog functions. (Upstream MCP servers' tools are added by `server.upstream`.)"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from server.registry import Tool
from server.settings import Settings
from tools.demo_data import create_demo_data
from tools.tables import TableCatalog

log = structlog.get_logger("castellan.tools")


def table_catalog(settings: Settings) -> TableCatalog:
    return TableCatalog(settings.tools.tables_root or settings.data_dir / "delta")


def configured_tools(settings: Settings) -> tuple[list[Tool], list[Callable[[], None]]]:
    """The tools, and what to call at shutdown."""
    from tools import demo_tools

    tables = table_catalog(settings)
    closers: list[Callable[[], None]] = []
    tools: list[Tool] = []
    modules = list(settings.tools.function_modules)
    if settings.demo:
        created = create_demo_data(tables.root)
        if created:
            log.info("demo_data_created", tables=created, root=str(tables.root))
        tools += demo_tools()
        modules.append("tools.demo_functions")
    if settings.tools.sql:
        from tools.sql_query import SqlQueryTool

        tools.append(SqlQueryTool(tables))
    if settings.tools.docs_table and tables.exists(settings.tools.docs_table):
        from tools.doc_index import DocIndex
        from tools.doc_search import DocSearchTool
        from tools.embeddings import Embedder, HashingEmbedder, MiniLmEmbedder, default_embedder

        choice = settings.tools.docs_embedder
        embedder: Embedder | None = (
            None
            if choice == "none"
            else HashingEmbedder()
            if choice == "hashing"
            else MiniLmEmbedder()
            if choice == "minilm"
            else default_embedder()
        )
        index = DocIndex(tables, settings.tools.docs_table, settings.data_dir / "doc_index.db", embedder=embedder)
        closers.append(index.close)
        tools.append(DocSearchTool(index))
    if modules:
        from tools.functions import FunctionTool, FunctionWorkers, load_functions

        workers = FunctionWorkers(memory_mb=settings.tools.function_memory_mb)
        closers.append(workers.close)
        tools += [
            FunctionTool(f, workers, settings.tools.function_timeout_seconds, settings.tools.function_cpu_seconds)
            for f in load_functions(modules)
        ]
    return tools, closers
