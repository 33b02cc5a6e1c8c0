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
    # Castellan's own resources (server/resources/own.py): analysts may see what orders and the
    # documents hold, not the customers table's schema and sample.
    ("analysts", "READ", "main.sales.orders__resource"),
    ("analysts", "READ", "main.support.docs__resource"),
    ("analysts", "READ", "main.support.docs__documents"),
)
DEMO_RESOURCES = ("main.sales.orders__resource", "main.support.docs__resource", "main.support.docs__documents")


def seed_demo_grants(catalog: LocalCatalog) -> None:
    """Create the demo catalog's groups and schemas and grant the demo privileges; idempotent."""
    for group in ("analysts", "admins"):
        catalog.add_principal(group, "group")
    catalog.add_securable("SCHEMA", "main.tools", owner="admins")
    catalog.add_securable("SCHEMA", "main.admin", owner="admins")
    for schema in ("main.sales", "main.support"):
        catalog.add_securable("SCHEMA", schema, owner="admins")
    catalog.set_owner("main", "admins")
    for resource in DEMO_RESOURCES:  # granted on before the gateway serves them
        catalog.add_securable("RESOURCE", resource)
    catalog.grant_many(DEMO_GRANTS)
