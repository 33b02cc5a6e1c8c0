"""The tools a gateway serves from its settings: demo tools, SQL over the Delta tables, document
search, catalog functions. (Upstream MCP servers' tools are added by `server.upstream`.)"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from server.auth.presented import PresentedTokens
from server.errors import ConfigError
from server.grants.databricks_obo import OnBehalf, on_behalf_for
from server.registry import Tool
from server.sandbox import SandboxMode, detect_mode
from server.sandbox.runtime import python_paths
from server.settings import Settings
from tools.demo_data import create_demo_data
from tools.tables import TableCatalog

log = structlog.get_logger("castellan.tools")


def table_catalog(settings: Settings) -> TableCatalog:
    return TableCatalog(settings.tools.tables_root or settings.data_dir / "delta")


def sandbox_mode(settings: Settings) -> SandboxMode:
    """The isolation tool code runs under here, logged (a warning when it is the weaker mode)."""
    mode = detect_mode(settings.tools.sandbox)
    if not mode.isolated and settings.environment == "production" and settings.tools.sandbox == "auto":
        raise ConfigError(
            f"production: tool code would run without namespaces ({mode.reason}); install bubblewrap and allow "
            "user namespaces, or accept the weaker mode explicitly with tools.sandbox = 'rlimits'"
        )
    data = settings.data_dir.resolve()
    runtime = next((p for p in python_paths() if p == data or p in data.parents), None)
    if runtime is not None:
        # every sandbox sees the Python runtime read-only: the signing key would be readable there
        raise ConfigError(f"data_dir {data} lies inside {runtime}, which tool sandboxes can read; move it out")
    if mode.isolated:
        log.info("tool_sandbox", mode=mode.name, detail=mode.describe())
    else:
        log.warning("tool_sandbox_weaker", mode=mode.name, reason=mode.reason, detail=mode.describe())
    return mode


def configured_tools(
    settings: Settings, on_behalf: OnBehalf | None = None
) -> tuple[list[Tool], list[Callable[[], None]]]:
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
    mode = sandbox_mode(settings) if settings.tools.sql or modules else None
    if settings.tools.sql:
        from tools.sql_query import SqlQueryTool
        from tools.sql_workers import SqlLimits

        t = settings.tools
        limits = SqlLimits(
            t.sql_workers,
            t.sql_workers_per_identity,
            t.sql_timeout_seconds,
            t.sql_memory_mb,
            t.sql_threads,
            t.sql_temp_mb,
        )
        sql = SqlQueryTool(tables, settings.data_dir / "sql-spill", limits, mode=mode)
        closers.append(sql.close)
        tools.append(sql)
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

        workers = FunctionWorkers(
            settings.tools.function_workers,
            settings.tools.function_memory_mb,
            mode=mode,
            calls_per_worker=settings.tools.function_calls_per_worker,
            per_identity=settings.tools.function_workers_per_identity,
        )
        closers.append(workers.close)
        tools += [
            FunctionTool(f, workers, settings.tools.function_timeout_seconds, settings.tools.function_cpu_seconds)
            for f in load_functions(modules)
        ]
    if settings.tools.databricks_functions:
        tools += _databricks_functions(settings, on_behalf)
    return tools, closers


def _databricks_functions(settings: Settings, on_behalf: OnBehalf | None) -> list[Tool]:
    """`on_behalf`: the gateway's federation of its callers' tokens (without one, for a listing outside
    a gateway, a federation that holds no caller's token: every call is refused)."""
    if not settings.tools.databricks_warehouse_id:
        raise ConfigError("tools.databricks_functions needs tools.databricks_warehouse_id (the SQL warehouse)")
    if settings.tools.databricks_identity != "on_behalf_of_user":
        on_behalf = None
    elif on_behalf is None:
        on_behalf = on_behalf_for(settings, PresentedTokens())
    try:
        from databricks.sdk import WorkspaceClient
        from databricks.sdk.core import Config

        from tools.uc_functions import uc_function_tools
    except ImportError:
        raise ConfigError("tools.databricks_functions needs the extra: pip install 'castellan[databricks]'") from None
    timeout = int(settings.tools.function_timeout_seconds)
    try:
        client = WorkspaceClient(
            config=Config(
                host=settings.grants.databricks_host or None,
                profile=settings.grants.databricks_profile or None,
                retry_timeout_seconds=timeout,
                http_timeout_seconds=timeout,
            )
        )
        found = uc_function_tools(
            client, settings.tools.databricks_functions, settings.tools.databricks_warehouse_id, timeout, on_behalf
        )
    except Exception as exc:
        raise ConfigError(f"cannot read the Unity Catalog functions: {str(exc)[:300]}") from None
    log.info("uc_functions", functions=[t.spec.name for t in found])
    return list(found)
