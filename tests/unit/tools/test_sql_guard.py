"""The SQL tool's read-only guard: what it refuses (before anything runs) and what it lets through."""

from __future__ import annotations

import pytest

from tools.sql_guard import Rejected, check

TABLES = {"main.sales.orders", "main.sales.customers"}


def known(name: str) -> bool:
    return name in TABLES


REFUSED = [
    # writes and DDL
    ("INSERT INTO main.sales.orders VALUES (1)", "INSERT"),
    ("UPDATE main.sales.orders SET amount = 0", "UPDATE"),
    ("DELETE FROM main.sales.orders", "DELETE"),
    ("MERGE INTO main.sales.orders t USING main.sales.customers s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE"),
    ("DROP TABLE main.sales.orders", "DROP"),
    ("CREATE TABLE x AS SELECT * FROM main.sales.orders", "CREATE"),
    ("ALTER TABLE main.sales.orders ADD COLUMN x INT", "ALTER"),
    ("TRUNCATE TABLE main.sales.orders", ""),
    # more than one statement (the classic injection)
    ("SELECT * FROM main.sales.orders; DROP TABLE main.sales.orders", "exactly one statement"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    ("SELECT * FROM main.sales.orders WHERE region = '' ; DELETE FROM main.sales.orders --'", "exactly one statement"),
    # files, engine state, extensions
    ("COPY main.sales.orders TO '/tmp/out.csv'", "COPY"),
    ("COPY (SELECT * FROM main.sales.orders) TO 'x.parquet'", "COPY"),
    ("ATTACH '/tmp/other.db' AS other", "ATTACH"),
    ("DETACH other", ""),
    ("INSTALL httpfs", ""),
    ("LOAD httpfs", ""),
    ("PRAGMA database_list", ""),
    ("SET enable_external_access = true", ""),
    ("EXPORT DATABASE '/tmp/dump'", ""),
    ("CALL pragma_version()", ""),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    ("SELECT * FROM read_parquet('s3://bucket/x.parquet')", "read_parquet"),
    ("SELECT * FROM read_json_auto('/etc/hosts')", ""),
    ("SELECT * FROM '/etc/passwd'", "not a table name"),
    ("SELECT * FROM 'data.csv' AS d", "not a table name"),
    ("SELECT * FROM glob('/home/*')", "glob"),
    ("SELECT getenv('HOME')", "getenv"),
    ("SELECT current_setting('threads')", "current_setting"),
    ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
    ("SELECT * FROM sniff_csv('/etc/passwd')", "sniff_csv"),
    ("SELECT read_text('/etc/passwd')", "read_text"),
    ("SELECT * FROM query('DROP TABLE x')", "query"),
    ("SELECT * FROM sqlite_scan('/tmp/x.db', 't')", "sqlite_scan"),
    # names that are not catalog tables
    ("SELECT * FROM orders", "full name"),
    ("SELECT * FROM main.sales.secret_table", "does not exist"),
    ("SELECT * FROM information_schema.tables", "full name"),
    ("SELECT * FROM main.sales.orders, pg_catalog.pg_class", "full name"),
    # a write hidden in a CTE or a subquery
    ("WITH gone AS (DELETE FROM main.sales.orders RETURNING *) SELECT * FROM gone", ""),
    ("SELECT * FROM (INSERT INTO main.sales.orders VALUES (1) RETURNING *)", ""),
    # not SQL, or nothing
    ("", "empty"),
    ("DESCRIBE main.sales.orders", ""),
    ("SHOW TABLES", ""),
    ("VACUUM", ""),
    ("CHECKPOINT", ""),
    ("BEGIN TRANSACTION", ""),
]


@pytest.mark.parametrize(("sql", "why"), REFUSED)
def test_refused_before_execution(sql: str, why: str) -> None:
    with pytest.raises(Rejected) as refused:
        check(sql, known)
    assert why.lower() in str(refused.value).lower()


def test_the_table_is_long_enough() -> None:
    assert len(REFUSED) >= 25


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("SELECT region, SUM(amount) FROM main.sales.orders GROUP BY region", ("main.sales.orders",)),
        (
            "SELECT c.name, o.amount FROM main.sales.orders o JOIN main.sales.customers c USING (customer_id)",
            ("main.sales.orders", "main.sales.customers"),
        ),
        (
            "WITH big AS (SELECT * FROM main.sales.orders WHERE amount > 100) SELECT COUNT(*) FROM big",
            ("main.sales.orders",),
        ),
        ("SELECT * FROM MAIN.Sales.ORDERS LIMIT 3", ("main.sales.orders",)),
        ("SELECT 1 AS one", ()),
        ("SELECT * FROM main.sales.orders UNION ALL SELECT * FROM main.sales.orders", ("main.sales.orders",)),
    ],
)
def test_queries_pass_with_the_tables_they_read(sql: str, tables: tuple[str, ...]) -> None:
    checked = check(sql, known)
    assert checked.tables == tables
    assert "main." not in checked.rewritten.lower()  # every table replaced by one the gateway registered


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM (WITH duckdb_settings AS (SELECT 1) SELECT 1), duckdb_settings",
        "WITH x AS (SELECT * FROM duckdb_settings), duckdb_settings AS (SELECT 1) SELECT * FROM x",
        "SELECT \"current_setting\"('home_directory')",
        "SELECT main.getenv('HOME')",
        "SELECT 'HOME'.getenv()",
        "SELECT json_execute_serialized_sql('{}')",
        "SELECT getvariable('x')",
        "SELECT version()",
        "SELECT pg_sleep(10)",
        "SELECT * FROM pg_settings",
    ],
)
def test_engine_state_is_refused_whatever_the_query_shape(query: str) -> None:
    with pytest.raises(Rejected):
        check(query, lambda name: name == "main.sales.orders")


def test_pure_functions_and_in_scope_ctes_are_allowed() -> None:
    query = (
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5), o AS "
        "(SELECT * FROM main.sales.orders) SELECT CAST(n AS INT), COALESCE(NULL, n), list_sum(range(3)), "
        "date_trunc('day', current_date), row_number() OVER (ORDER BY n), median(n), "
        "EXTRACT(year FROM current_date), CASE WHEN n > 1 THEN 'x' END FROM t, o"
    )
    assert check(query, lambda name: name == "main.sales.orders").tables == ("main.sales.orders",)


def _duckdb_functions(kinds: tuple[str, ...]) -> list[str]:
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type IN "
            f"({', '.join(repr(k) for k in kinds)}) ORDER BY 1"
        ).fetchall()
    finally:
        con.close()
    return [str(r[0]) for r in rows if str(r[0]).isidentifier()]


def test_every_function_outside_the_allow_list_is_refused_however_it_is_written() -> None:
    from tools.sql_guard import allowed_functions

    allowed = allowed_functions()
    refused = [n for n in _duckdb_functions(("scalar", "aggregate", "macro", "window")) if n.lower() not in allowed]
    assert {"current_setting", "getvariable", "version", "pg_sleep"} <= set(refused)
    for name in refused:
        for query in (
            f"SELECT {name}('x')",
            f"SELECT \"{name}\"('x')",
            f"SELECT main.{name}('x')",
            f"SELECT 'x'.{name}()",
        ):
            with pytest.raises(Rejected):
                check(query, lambda table: table == "main.sales.orders")


def test_no_table_function_or_system_view_is_reachable_from_from() -> None:
    names = [*_duckdb_functions(("table", "table_macro")), "duckdb_settings", "pg_settings", "sqlite_master"]
    for name in names:
        for query in (f"SELECT * FROM {name}()", f"SELECT * FROM {name}", f"SELECT * FROM main.sales.orders, {name}"):
            with pytest.raises(Rejected):
                check(query, lambda table: table == "main.sales.orders")
