"""Read-only SQL, decided on the syntax tree: one query, no writes, no files, known tables only, and
an allow-list of functions (DuckDB's pure scalar, aggregate and window functions).

The SQL tool runs only what this module accepts, with every table reference replaced by a table the
gateway itself registered (the query engine has no file or network access either: defence in depth).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

# Statement kinds that are never a read, wherever they appear in the tree (a CTE can hold a DELETE).
_FORBIDDEN_NODES: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, name)
    for name in (
        "DDL", "DML", "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "AlterColumn",
        "TruncateTable", "Copy", "Attach", "Detach", "Install", "Pragma", "Set", "Use", "Command",
        "Transaction", "Commit", "Rollback", "Describe", "Show", "LoadData", "Cache", "Uncache",
        "Refresh", "Grant", "Revoke", "Into", "Export", "Summarize", "Analyze",
    )
    if hasattr(exp, name)
)  # fmt: skip
_FILE_READERS: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, name) for name in ("ReadCSV", "ReadParquet", "ReadJSON") if hasattr(exp, name)
)
# Functions that read files, the environment or the engine's own state (settings, catalog, variables,
# serialized SQL), refused even where DuckDB lists them as scalar functions.
_FORBIDDEN_FUNCTION = re.compile(
    r"^(read_|scan_|parquet_|csv_|json_|sniff_|glob$|getenv$|current_|duckdb_|pragma_|sqlite_|postgres_|"
    r"mysql_|iceberg_|delta_|query$|query_table$|load_|install_|from_json$|read$|system$|which_secret$|"
    r"enable_|disable_|set_|checkpoint$|force_checkpoint$|import_|export_|pg_|has_\w*privilege$|getvariable$|"
    r"version$|user$|session_user$|inet_|in_search_path$|col_description$|obj_description$|"
    r"shobj_description$|format_type$|format_pg_type$|get_block_size$|txid_|nextval$|currval$|"
    r"map_to_pg_oid$|json_serialize|json_deserialize|json_execute)",
    re.IGNORECASE,
)
# Pure clock functions that the prefix rules above would catch.
_CLOCK = frozenset({"current_date", "current_time", "current_timestamp", "current_localtime", "current_localtimestamp"})
# Syntax that sqlglot models as a function but DuckDB does not list as one.
_SYNTAX = frozenset({"cast", "try_cast", "extract", "coalesce", "exists", "nullif", "unnest", "case", "if", "ifnull"})
_CALL = re.compile(r'^\s*"?([A-Za-z_][A-Za-z0-9_]*)"?\s*\(')


@functools.lru_cache(maxsize=1)
def allowed_functions() -> frozenset[str]:
    """DuckDB's own scalar, aggregate, window and macro functions (from this DuckDB version's catalog),
    minus those that reach files, settings or the engine's state. Table functions are never allowed."""
    import duckdb

    con = duckdb.connect(":memory:", config={"enable_external_access": False})
    try:
        rows = con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() "
            "WHERE function_type IN ('scalar', 'aggregate', 'window', 'macro')"
        ).fetchall()
    finally:
        con.close()
    names = {str(r[0]).lower() for r in rows}
    return frozenset(n for n in names if n in _CLOCK or not _FORBIDDEN_FUNCTION.match(n))


def _called_name(node: exp.Func) -> str | None:
    """The function DuckDB will call for this node (None for pure syntax: CASE, [..], {..}, CURRENT_DATE)."""
    if isinstance(node, exp.Anonymous):
        this = node.this
        return (this.name if isinstance(this, exp.Identifier) else str(this)).lower()
    match = _CALL.match(node.sql("duckdb"))
    return match.group(1).lower() if match else None


def _visible_cte(table: exp.Table, name: str) -> bool:
    """Whether a one-part name refers to a CTE in scope here (else it would reach DuckDB's catalog: its
    system views). A CTE is visible in its query's body and in the CTEs after it (itself when recursive)."""
    child: Any = table
    node = table.parent
    while node is not None:
        if isinstance(node, exp.With) and isinstance(child, exp.CTE):
            ctes = list(node.expressions)
            upto = ctes.index(child) + (1 if node.args.get("recursive") else 0)
            if any(c.alias_or_name.lower() == name for c in ctes[:upto]):
                return True
        elif isinstance(node, exp.Query):
            with_ = node.args.get("with_") or node.args.get("with")
            ctes = with_.expressions if isinstance(with_, exp.With) and child is not with_ else []
            if any(c.alias_or_name.lower() == name for c in ctes):
                return True
        child, node = node, node.parent
    return False


class Rejected(ValueError):
    """The SQL is not an allowed read-only query; the message says why."""


@dataclass(frozen=True, slots=True)
class CheckedQuery:
    """An accepted query: the tables it reads, and its SQL with each table replaced by `__t<n>`."""

    tables: tuple[str, ...]
    rewritten: str


def check(sql: str, table_exists: Callable[[str], bool]) -> CheckedQuery:
    """Accepts exactly one read-only query over known `catalog.schema.table` names, or raises `Rejected`."""
    if not sql.strip():
        raise Rejected("empty query")
    try:
        statements = [s for s in sqlglot.parse(sql, read="duckdb") if s is not None]
    except SqlglotError as exc:
        raise Rejected(f"not valid SQL: {str(exc).splitlines()[0][:200]}") from None
    if len(statements) != 1:
        raise Rejected(f"exactly one statement is allowed, got {len(statements)}")
    tree = statements[0]
    allowed = allowed_functions()
    if not isinstance(tree, exp.Query):
        raise Rejected(f"only queries (SELECT) are allowed, not {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise Rejected(f"{node.key.upper()} is not allowed: queries only")
        if isinstance(node, exp.Func):
            if isinstance(node, _FILE_READERS):
                raise Rejected(f"function {node.sql_name().lower()} is not allowed (it reads files)")
            name = _called_name(node)
            if name is None or name in allowed:
                continue
            if name in _SYNTAX and not _FORBIDDEN_FUNCTION.match(name):
                continue
            raise Rejected(f"function {name} is not allowed")

    tables: dict[str, str] = {}
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            raise Rejected(f"table functions are not allowed: {table.this.sql('duckdb')[:80]}")
        parts = [p.name for p in (table.args.get("catalog"), table.args.get("db"), table.this) if p is not None]
        if any(isinstance(p, exp.Identifier) and p.quoted and not re.fullmatch(r"\w+", p.name) for p in
               (table.args.get("catalog"), table.args.get("db"), table.this) if p is not None):  # fmt: skip
            raise Rejected(f"{'.'.join(parts)!r} is not a table name (files cannot be read)")
        if len(parts) == 1 and _visible_cte(table, parts[0].lower()):
            continue
        if len(parts) != 3:
            raise Rejected(f"table {'.'.join(parts)!r}: use the full name catalog.schema.table")
        name = ".".join(p.lower() for p in parts)
        if not table_exists(name):
            raise Rejected(f"table {name} does not exist")
        alias = tables.setdefault(name, f"__t{len(tables)}")
        replacement = exp.Table(this=exp.to_identifier(alias))
        replacement.set("alias", table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(parts[2])))
        table.replace(replacement)
    return CheckedQuery(tuple(tables), tree.sql("duckdb"))
