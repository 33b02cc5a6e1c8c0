"""Where the Delta tables live: `catalog.schema.table` names mapped to Delta table directories.

A table is a directory `<root>/<catalog>/<schema>/<table>` holding a Delta log. The same layout a
Unity Catalog managed location has, minus the metastore: the grants come from the grant source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_PART = re.compile(r"^[A-Za-z0-9_]+$")


class TableCatalog:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        parts = name.lower().split(".")
        if len(parts) != 3 or not all(_PART.match(p) for p in parts):
            raise KeyError(name)
        return self.root.joinpath(*parts)

    def exists(self, name: str) -> bool:
        try:
            return (self.path(name) / "_delta_log").is_dir()
        except KeyError:
            return False

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            ".".join(p.relative_to(self.root).parts) for p in self.root.glob("*/*/*") if (p / "_delta_log").is_dir()
        )

    def open(self, name: str) -> Any:
        """The Delta table (deltalake.DeltaTable) at its latest version."""
        from deltalake import DeltaTable

        return DeltaTable(str(self.path(name)))
