"""Unity Catalog functions as tools, against a fake Databricks workspace that speaks the real wire
format (tests/fakes/databricks_uc.py): the schema comes from the function's Unity Catalog definition,
and a call is a parameterised statement on the configured warehouse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.grants.local import LocalCatalog
from tests.fakes import databricks_uc
from tests.fakes.databricks_uc import FakeFunction
from tools.uc_functions import uc_function_tools

pytestmark = pytest.mark.anyio


async def test_a_uc_function_is_described_and_called_through_statement_execution(tmp_path: Path) -> None:
    from databricks.sdk import WorkspaceClient

    catalog = LocalCatalog(tmp_path / "catalog.db")
    catalog.add_securable("FUNCTION", "sales.pricing.net_price")
    async with databricks_uc.serve(catalog) as (workspace, host):
        workspace.functions["sales.pricing.net_price"] = FakeFunction(
            params=[("gross", "DOUBLE", "Price with tax"), ("rate", "DOUBLE", "Tax rate, e.g. 0.2")],
            returns="DOUBLE",
            comment="Net price from a gross price and a tax rate.",
            body=lambda gross, rate: round(gross / (1 + rate), 2),
        )
        client = await asyncio.to_thread(WorkspaceClient, host=host, token=databricks_uc.TOKEN)
        (tool,) = await asyncio.to_thread(uc_function_tools, client, ["sales.pricing.net_price"], "wh-123")
        assert tool.spec.name == tool.spec.securable == "sales.pricing.net_price"
        assert tool.spec.description == "Net price from a gross price and a tax rate."
        assert tool.spec.input_schema["properties"]["gross"] == {"type": "number", "description": "Price with tax"}
        assert tool.spec.input_schema["required"] == ["gross", "rate"]

        result = await tool.invoke({"gross": 120.0, "rate": 0.2})
        assert result.structured == {"result": 100.0}
        (sent,) = workspace.statements
        assert sent["warehouse_id"] == "wh-123"
        assert sent["statement"] == "SELECT `sales`.`pricing`.`net_price`(gross => :gross, rate => :rate) AS result"
        assert sent["parameters"] == [
            {"name": "gross", "value": "120.0", "type": "DOUBLE"},
            {"name": "rate", "value": "0.2", "type": "DOUBLE"},
        ]  # values travel as parameters, never spliced into the SQL

        workspace.functions["sales.pricing.net_price"].body = lambda gross, rate: 1 / 0
        failed = await tool.invoke({"gross": 1.0, "rate": 0.0})
        assert failed.is_error
        assert "division by zero" in failed.text
