"""The demo dataset: a few Delta tables (sales and support documents), created by `castellan demo-data`
(and by `castellan serve` in demo mode when they are missing)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

from tools.tables import TableCatalog

ORDERS = "main.sales.orders"
CUSTOMERS = "main.sales.customers"
DOCS = "main.support.docs"
DEMO_TABLES = (ORDERS, CUSTOMERS, DOCS)

_REGIONS = ("EMEA", "AMER", "APAC")
_PRODUCTS = (("Lakehouse Basic", 1200.0), ("Lakehouse Pro", 4800.0), ("Governance Add-on", 900.0))

DOCUMENTS = (
    ("kb-001", "Resetting a forgotten password", "Open the sign-in page, choose 'Forgot password' and follow the "
     "e-mailed link within 30 minutes. Links expire after one use."),
    ("kb-002", "Refund policy", "Annual subscriptions are refundable within 30 days of purchase. Monthly plans are "
     "not refunded, but can be cancelled at any time before the next billing date."),
    ("kb-003", "Exporting data to CSV", "Use the Export button on any table view. Exports above one million rows "
     "are delivered as a compressed file by e-mail."),
    ("kb-004", "Single sign-on with SAML", "Administrators configure SAML under Settings, Security. Upload the "
     "identity provider's metadata XML and map the e-mail attribute."),
    ("kb-005", "API rate limits", "The public API allows 600 requests per minute per token. Requests above the "
     "limit get HTTP 429 with a Retry-After header."),
    ("kb-006", "Upgrading from Basic to Pro", "Upgrades take effect immediately and are prorated for the rest of "
     "the billing period. Downgrades apply at the next renewal."),
)  # fmt: skip


def create_demo_data(root: Path, overwrite: bool = False) -> list[str]:
    """Writes the demo tables under `root`; returns the names created (existing ones are kept)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    tables = TableCatalog(root)
    created = []
    customers = pa.table(
        {
            "customer_id": [f"c-{i:03d}" for i in range(1, 13)],
            "name": [f"Customer {i}" for i in range(1, 13)],
            "email": [f"contact{i}@example.com" for i in range(1, 13)],
            "region": [_REGIONS[i % 3] for i in range(1, 13)],
        }
    )
    start = date(2026, 1, 5)
    orders = pa.table(
        {
            "order_id": list(range(1001, 1061)),
            "customer_id": [f"c-{(i * 7) % 12 + 1:03d}" for i in range(60)],
            "order_date": [start + timedelta(days=i * 5) for i in range(60)],
            "region": [_REGIONS[(i * 7 % 12 + 1) % 3] for i in range(60)],
            "product": [_PRODUCTS[i % 3][0] for i in range(60)],
            "quantity": [1 + i % 4 for i in range(60)],
            "amount": [_PRODUCTS[i % 3][1] * (1 + i % 4) for i in range(60)],
        }
    )
    docs = pa.table(
        {
            "doc_id": [d[0] for d in DOCUMENTS],
            "title": [d[1] for d in DOCUMENTS],
            "body": [d[2] for d in DOCUMENTS],
        }
    )
    for name, data, config in (
        (CUSTOMERS, customers, {}),
        (ORDERS, orders, {}),
        (DOCS, docs, {"delta.enableChangeDataFeed": "true"}),
    ):
        if tables.exists(name) and not overwrite:
            continue
        path = tables.path(name)
        path.mkdir(parents=True, exist_ok=True)
        write_deltalake(str(path), data, mode="overwrite", configuration=config or None)
        created.append(name)
    return created
