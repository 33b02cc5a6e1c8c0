"""Resources are securables of the local catalog: READ on them, inherited from their schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.grants.local import LocalCatalog
from server.identity import Principal

pytestmark = pytest.mark.anyio
RESOURCE = "main.upstream.files__resource__file_readme"


async def test_read_granted_on_the_schema_covers_its_resources(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path / "catalog.db")
    catalog.add_principal("readers", "group")
    catalog.add_securable("RESOURCE", RESOURCE)
    catalog.grant_many([("readers", "READ", "main.upstream")])
    held = await catalog.privileges([Principal("group", "readers")], "RESOURCE", RESOURCE)
    assert "READ" in held
    await catalog.close()


async def test_a_catalog_made_before_resources_takes_them_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE securables (name TEXT PRIMARY KEY, type TEXT NOT NULL CHECK "
        "(type IN ('CATALOG', 'SCHEMA', 'FUNCTION', 'TABLE')), owner TEXT NOT NULL DEFAULT '')"
    )
    old.execute("INSERT INTO securables VALUES ('main', 'CATALOG', 'admins')")
    old.commit()
    old.close()
    catalog = LocalCatalog(path)
    catalog.add_securable("RESOURCE", RESOURCE)
    assert catalog.securable_type(RESOURCE) == "RESOURCE"  # not dropped by the old CHECK
    assert catalog.securable_type("main") == "CATALOG"
    await catalog.close()
