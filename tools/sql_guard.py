"""Read-only SQL, decided on the syntax tree: one query, no writes, no files, known tables only.

The SQL tool runs only what this module accepts, with every table reference replaced by a table the
gateway itself registered (the query engine has no file or network access either: defence in depth).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

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
# Functions that read files, the environment or the engine's own state.
_FORBIDDEN_FUNCTION = re.compile(
    r"^(read_|scan_|parquet_|csv_|json_|sniff_|glob$|getenv$|current_setting$|duckdb_|pragma_|sqlite_|postgres_|"
    r"mysql_|iceberg_|delta_|query$|query_table$|load_|install_|from_json$|read$|system$|which_secret$|"
    r"enable_|disable_|set_|checkpoint$|force_checkpoint$|import_|export_)",
    re.IGNORECASE,
)


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
    if not isinstance(tree, exp.Query):
        raise Rejected(f"only queries (SELECT) are allowed, not {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise Rejected(f"{node.key.upper()} is not allowed: queries only")
        if isinstance(node, exp.Func):
            name = node.sql_name() if not isinstance(node, exp.Anonymous) else str(node.this)
            if isinstance(node, _FILE_READERS):
                raise Rejected(f"function {name.lower()} is not allowed (it reads files)")
            if _FORBIDDEN_FUNCTION.match(name):
                raise Rejected(f"function {name.lower()} is not allowed")

    cte_names = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    tables: dict[str, str] = {}
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            raise Rejected(f"table functions are not allowed: {table.this.sql('duckdb')[:80]}")
        parts = [p.name for p in (table.args.get("catalog"), table.args.get("db"), table.this) if p is not None]
        if any(isinstance(p, exp.Identifier) and p.quoted and not re.fullmatch(r"\w+", p.name) for p in
               (table.args.get("catalog"), table.args.get("db"), table.this) if p is not None):  # fmt: skip
            raise Rejected(f"{'.'.join(parts)!r} is not a table name (files cannot be read)")
        if len(parts) == 1 and parts[0].lower() in cte_names:
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
