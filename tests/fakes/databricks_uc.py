"""A fake Databricks workspace that serves the Unity Catalog endpoints the databricks grant source uses.

A Databricks workspace cannot run here, so this small aiohttp server speaks the real wire format,
backed by a `LocalCatalog` holding the test's grants. Paths and shapes come from the REST reference
("Get Effective Permissions", `GET /api/2.1/unity-catalog/effective-permissions/{securable_type}/
{securable_full_name}` with `principal`, `max_results`, `page_token`) and from databricks-sdk 0.156's
`GrantsAPI.get_effective`, `EffectivePermissionsList` / `EffectivePrivilegeAssignment` /
`EffectivePrivilege.from_dict` (privileges as `USE_CATALOG`-style enum values, `inherited_from_type`
and `inherited_from_name`), `FunctionInfo` / `TableInfo` / `SchemaInfo` / `CatalogInfo` (`owner`), and
the SDK's error mapping (`{"error_code": "NOT_FOUND", "message": ...}` with HTTP 404).

Behaviour it assumes of Unity Catalog: effective permissions include privileges inherited from parent
securables and from the principal's group memberships, and do not include ownership (the client
reads `owner` itself). With `max_results=0` the first page is empty with a `next_page_token`, which
the API documents as possible and clients must follow.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from server.grants.local import LocalCatalog
from tests.fakes.loopback import serve_app

TOKEN = "dapi-castellan-test"
_PLURAL = {"catalogs": "CATALOG", "schemas": "SCHEMA", "functions": "FUNCTION", "tables": "TABLE"}


@dataclass
class FakeWorkspace:
    catalog: LocalCatalog
    down: bool = False
    requests: list[str] = field(default_factory=list)

    def _error(self, status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error_code": code, "message": message}, status=status)

    def _guard(self, request: web.Request) -> web.Response | None:
        self.requests.append(request.path_qs)
        if self.down:
            return self._error(503, "TEMPORARILY_UNAVAILABLE", "The service is temporarily unavailable.")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "UNAUTHENTICATED", "Invalid access token.")
        return None

    async def effective(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        securable_type = request.match_info["type"].upper()
        name = request.match_info["name"]
        if self.catalog.securable_type(name) != securable_type:
            return self._error(404, "NOT_FOUND", f"{securable_type.title()} '{name}' does not exist.")
        principal = request.query.get("principal")
        if request.query.get("max_results") == "0" and "page_token" not in request.query:
            return web.json_response({"privilege_assignments": [], "next_page_token": "page-2"})
        principals = [principal] if principal else []
        privileges = [
            {
                "privilege": d.privilege.replace(" ", "_"),
                **(
                    {"inherited_from_type": d.inherited_from_type, "inherited_from_name": d.inherited_from}
                    if d.inherited_from
                    else {}
                ),
            }
            for d in self.catalog.granted_detail(principals, name)
        ]
        assignments = [{"principal": principal, "privileges": privileges}] if privileges and principal else []
        return web.json_response({"privilege_assignments": assignments})

    async def info(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        kind = _PLURAL[request.match_info["kind"]]
        name = request.match_info["name"]
        if self.catalog.securable_type(name) != kind:
            return self._error(404, "NOT_FOUND", f"{kind.title()} '{name}' does not exist.")
        owner = self.catalog.owner(name) or None
        body = {"name": name.split(".")[-1], "full_name": name, **({"owner": owner} if owner else {})}
        return web.json_response(body)

    async def list_catalogs(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        names = [s["name"] for s in self.catalog.export()["securables"] if s["type"] == "CATALOG"]
        return web.json_response({"catalogs": [{"name": n, "full_name": n} for n in names]})


async def _no_metadata(request: web.Request) -> web.Response:
    return web.Response(status=404)


@contextlib.asynccontextmanager
async def serve(catalog: LocalCatalog) -> AsyncIterator[tuple[FakeWorkspace, str]]:
    """Run the fake on a loopback port; yields (workspace, host URL)."""
    workspace = FakeWorkspace(catalog)
    app = web.Application()
    app.router.add_get("/.well-known/databricks-config", _no_metadata)
    app.router.add_get("/api/2.1/unity-catalog/effective-permissions/{type}/{name}", workspace.effective)
    app.router.add_get("/api/2.1/unity-catalog/catalogs", workspace.list_catalogs)
    app.router.add_get("/api/2.1/unity-catalog/{kind:catalogs|schemas|functions|tables}/{name}", workspace.info)
    async with serve_app(app) as url:
        yield workspace, url
