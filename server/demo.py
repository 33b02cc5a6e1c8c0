"""The demo set-up: grants in the local catalog for the demo tools and groups."""

from __future__ import annotations

from server.grants.local import LocalCatalog

# Unity Catalog style: USE CATALOG and USE SCHEMA to reach a function, EXECUTE to call it.
# Granting EXECUTE on a schema covers every function in it.
DEMO_GRANTS: tuple[tuple[str, str, str], ...] = (
    ("analysts", "USE CATALOG", "main"),
    ("analysts", "USE SCHEMA", "main.tools"),
    ("analysts", "EXECUTE", "main.tools"),
    ("admins", "ALL PRIVILEGES", "main"),
    # Data: analysts read orders and support documents, not the customers table (personal data).
    ("analysts", "USE SCHEMA", "main.sales"),
    ("analysts", "USE SCHEMA", "main.support"),
    ("analysts", "SELECT", "main.sales.orders"),
    ("analysts", "SELECT", "main.support.docs"),
)


def seed_demo_grants(catalog: LocalCatalog) -> None:
    """Create the demo catalog's groups and schemas and grant the demo privileges; idempotent."""
    for group in ("analysts", "admins"):
        catalog.add_principal(group, "group")
    catalog.add_securable("SCHEMA", "main.tools", owner="admins")
    catalog.add_securable("SCHEMA", "main.admin", owner="admins")
    for schema in ("main.sales", "main.support"):
        catalog.add_securable("SCHEMA", schema, owner="admins")
    catalog.set_owner("main", "admins")
    catalog.grant_many(DEMO_GRANTS)
