"""A fake Databricks workspace that serves the Unity Catalog endpoints the databricks grant source uses.

A Databricks workspace cannot run here, so this small aiohttp server speaks the real wire format,
backed by a `LocalCatalog` holding the test's grants. Paths and shapes come from the REST reference
("Get Effective Permissions", `GET /api/2.1/unity-catalog/effective-permissions/{securable_type}/
{securable_full_name}` with `principal`, `max_results`, `page_token`) and from databricks-sdk 0.156's
`GrantsAPI.get_effective`, `EffectivePermissionsList` / `EffectivePrivilegeAssignment` /
`EffectivePrivilege.from_dict` (privileges as `USE_CATALOG`-style enum values, `inherited_from_type`
and `inherited_from_name`), `FunctionInfo` / `TableInfo` / `SchemaInfo` / `CatalogInfo` (`owner`), and
the SDK's error mapping (`{"error_code": "NOT_FOUND", "message": ...}` with HTTP 404).

Principals, from the SCIM 2.0 API of the workspace (`GET /api/2.0/preview/scim/v2/Users`,
`/ServicePrincipals`, `/Groups` with `filter`, `attributes`, `startIndex`, `count`; a SCIM `ListResponse`
with `Resources`, `totalResults`, `startIndex`, `itemsPerPage`, as databricks-sdk 0.156's `UsersAPI.list`
and friends page through it until an empty page): users by `userName`, service principals by
`applicationId`, groups by `displayName`, from the catalog's registered principals. Only the simple
filter `attribute eq "value"` (the value a JSON string, RFC 7644 §3.4.2.2) is understood. As in Unity
Catalog, the grant endpoints take a principal as a bare name, resolved to whichever principal has it.

Behaviour it assumes of Unity Catalog: effective permissions include privileges inherited from parent
securables and from the principal's group memberships, and do not include ownership (the client
reads `owner` itself). With `max_results=0` the first page is empty with a `next_page_token`, which
the API documents as possible and clients must follow.

Unity Catalog functions and SQL statement execution, for the catalog-function tools: `GET
/api/2.1/unity-catalog/functions/{name}` returns a `FunctionInfo` (`input_params.parameters` with
`name`, `type_name`, `type_text`, `position`, `comment`, `parameter_default`; `data_type`; `comment`),
and `POST /api/2.0/sql/statements` runs `SELECT `c`.`s`.`f`(p => :p, ...) AS result` with named
parameters (`{"name", "value", "type"}`, values as strings) against Python stand-ins for the function
bodies, answering a `StatementResponse` (`status.state`, `manifest.schema.columns`,
`result.data_array` with values as strings, the JSON_ARRAY format).

OAuth token federation, for the on-behalf-of-user mode ("Authenticate with an identity provider
token"): `POST /oidc/v1/token` with the form `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`,
`subject_token` (a JWT), `subject_token_type=urn:ietf:params:oauth:token-type:jwt` and `scope`
(`all-apis`), answered `{"access_token", "token_type": "Bearer", "expires_in", "scope"}`, or an OAuth
error (`{"error": "invalid_grant", "error_description"}`, HTTP 400/401). Its federation policy is the
test's: `federation_keys` verify the JWT's signature, and `federation_issuer`, `federation_audience`
and `exp` are checked; `sub` names the workspace principal (registered in the catalog as a user or
service principal). `GET /api/2.0/preview/scim/v2/Me` names a token's principal (`userName`) and its
groups (`groups[].display`, memberships resolved by the catalog, nested ones included).

With a federated token the workspace answers as that principal, which is not a workspace admin: it may
read effective permissions only for itself, its groups and `account users` (403 `PERMISSION_DENIED`
otherwise), and a statement calling a function it lacks `USE CATALOG`, `USE SCHEMA` or `EXECUTE` on
fails (`status.state` FAILED, `[INSUFFICIENT_PERMISSIONS]`). Bodies declared `with_user` also get the
caller as `current_user` (what Databricks SQL's `current_user()` gives). Every request's
`Authorization` header is kept in `authorizations` (path, header), so tests can read the wire.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from server.grants.local import LocalCatalog
from server.identity import Principal
from tests.fakes.loopback import serve_app

TOKEN = "dapi-castellan-test"
"""The gateway's own token: a workspace admin."""
ADMIN = "castellan-gateway@example.com"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
_PLURAL = {"catalogs": "CATALOG", "schemas": "SCHEMA", "functions": "FUNCTION", "tables": "TABLE"}
_SCIM = {
    "Users": ("user", "userName"),
    "ServicePrincipals": ("service_principal", "applicationId"),
    "Groups": ("group", "displayName"),
}
_FILTER = re.compile(r'^(\w+) eq ("(?:[^"\\]|\\.)*")$')


@dataclass
class FakeFunction:
    """A Unity Catalog function: its parameters ((name, UC type, comment)), return type and body."""

    params: list[tuple[str, str, str]]
    returns: str
    comment: str
    body: Callable[..., Any]
    with_user: bool = False
    """The body is given `current_user=` (the principal the statement runs as)."""


_CALL = re.compile(r"^SELECT `(\w+)`\.`(\w+)`\.`(\w+)`\((.*)\) AS result$")
_CASTS: dict[str, Callable[[str], Any]] = {"INT": int, "LONG": int, "DOUBLE": float, "DECIMAL": float, "STRING": str}


@dataclass
class FakeWorkspace:
    catalog: LocalCatalog
    down: bool = False
    requests: list[str] = field(default_factory=list)
    functions: dict[str, FakeFunction] = field(default_factory=dict)
    statements: list[dict[str, Any]] = field(default_factory=list)
    scim_restricted: bool = False
    """Answer SCIM lists as Databricks does for non-admin callers: entries without their names."""
    federation_keys: Any = None
    """A `joserfc` key set the federation policy trusts (None: token federation is refused)."""
    federation_issuer: str = ""
    federation_audience: str = ""
    federated_lifetime: int = 3600
    federations: list[dict[str, str]] = field(default_factory=list)
    """Every token federation request's form."""
    issued: dict[str, str] = field(default_factory=dict)
    """Federated Databricks token -> the principal it stands for."""
    authorizations: list[tuple[str, str]] = field(default_factory=list)

    def _error(self, status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error_code": code, "message": message}, status=status)

    def _guard(self, request: web.Request) -> web.Response | None:
        self.requests.append(request.path_qs)
        header = request.headers.get("Authorization", "")
        self.authorizations.append((request.path, header))
        if self.down:
            return self._error(503, "TEMPORARILY_UNAVAILABLE", "The service is temporarily unavailable.")
        if header != f"Bearer {TOKEN}" and header.removeprefix("Bearer ") not in self.issued:
            return self._error(401, "UNAUTHENTICATED", "Invalid access token.")
        return None

    def _caller(self, request: web.Request) -> str | None:
        """The principal a federated token stands for; None for the gateway's own (admin) token."""
        return self.issued.get(request.headers.get("Authorization", "").removeprefix("Bearer "))

    def groups_of(self, principal: str) -> list[str]:
        """The groups `principal` is in, nested memberships included."""
        members = self.catalog.export()["members"]
        found: list[str] = []
        todo = [principal]
        while todo:
            current = todo.pop()
            for m in members:
                if m["member"] == current and m["group"] not in found:
                    found.append(m["group"])
                    todo.append(m["group"])
        return sorted(found)

    async def federate(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.federations.append({k: str(v) for k, v in form.items()})
        if self.down:
            return self._error(503, "TEMPORARILY_UNAVAILABLE", "The service is temporarily unavailable.")

        def refused(description: str, error: str = "invalid_grant") -> web.Response:
            return web.json_response({"error": error, "error_description": description}, status=400)

        if form.get("grant_type") != TOKEN_EXCHANGE or form.get("subject_token_type") != JWT_TYPE:
            return refused("unsupported grant or subject token type", "unsupported_grant_type")
        if self.federation_keys is None:
            return refused("no federation policy matches the token")
        from joserfc import jwt
        from joserfc.errors import JoseError

        try:
            token = jwt.decode(str(form.get("subject_token", "")), self.federation_keys)
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self.federation_issuer},
                aud={"essential": True, "value": self.federation_audience},
                exp={"essential": True},
            ).validate(token.claims)
        except (JoseError, ValueError) as exc:
            return refused(f"the subject token does not satisfy the federation policy: {type(exc).__name__}")
        subject = str(token.claims.get("sub", ""))
        if self.catalog.kind_of(subject) not in ("user", "service_principal"):
            return refused(f"no workspace principal {subject!r}")
        issued = f"dbx-obo-{uuid.uuid4().hex}"
        self.issued[issued] = subject
        return web.json_response(
            {"access_token": issued, "token_type": "Bearer", "expires_in": self.federated_lifetime,
             "scope": form.get("scope", "all-apis")}
        )  # fmt: skip

    async def me(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        name = self._caller(request) or ADMIN
        groups = self.groups_of(name)
        return web.json_response(
            {"id": f"user-{name}", "userName": name, "groups": [{"display": g, "value": f"group-{g}"} for g in groups]}
        )

    async def effective(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        securable_type = request.match_info["type"].upper()
        name = request.match_info["name"]
        if self.catalog.securable_type(name) != securable_type:
            return self._error(404, "NOT_FOUND", f"{securable_type.title()} '{name}' does not exist.")
        principal = request.query.get("principal")
        acting = self._caller(request)
        if acting is not None and principal not in (acting, "account users", *self.groups_of(acting)):
            return self._error(
                403, "PERMISSION_DENIED", f"User does not have MANAGE on {securable_type.title()} '{name}'."
            )
        if request.query.get("max_results") == "0" and "page_token" not in request.query:
            return web.json_response({"privilege_assignments": [], "next_page_token": "page-2"})
        kind = self.catalog.kind_of(principal) if principal else None  # a bare name, as Unity Catalog takes it
        principals = [Principal(kind, principal)] if principal and kind else []  # type: ignore[arg-type]
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
        body: dict[str, Any] = {"name": name.split(".")[-1], "full_name": name, **({"owner": owner} if owner else {})}
        if kind == "FUNCTION" and name in self.functions:
            fn = self.functions[name]
            catalog, schema, _ = name.split(".")
            body |= {
                "catalog_name": catalog,
                "schema_name": schema,
                "comment": fn.comment,
                "data_type": fn.returns,
                "full_data_type": fn.returns,
                "input_params": {
                    "parameters": [
                        {"name": n, "type_name": t, "type_text": t.lower(), "position": i, "comment": c}
                        for i, (n, t, c) in enumerate(fn.params)
                    ]
                },
            }
        return web.json_response(body)

    async def statement(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        body = await request.json()
        self.statements.append(body)
        match = _CALL.match(body.get("statement", ""))
        if not match or not body.get("warehouse_id"):
            return self._error(400, "INVALID_PARAMETER_VALUE", "unsupported statement")
        name = ".".join(match.groups()[:3])
        fn = self.functions.get(name)
        if fn is None:
            return self._error(404, "NOT_FOUND", f"Function '{name}' does not exist.")
        given = {p["name"]: _CASTS.get(p.get("type", "STRING"), str)(p["value"]) for p in body.get("parameters", [])}
        statement_id = uuid.uuid4().hex
        acting = self._caller(request)
        if acting is not None:
            missing = self._missing_to_call(acting, name)
            if missing:
                error = {"error_code": "PERMISSION_DENIED", "message": f"[INSUFFICIENT_PERMISSIONS] {missing}"}
                return web.json_response({"statement_id": statement_id, "status": {"state": "FAILED", "error": error}})
            if fn.with_user:
                given["current_user"] = acting
        try:
            value = fn.body(**given)
        except Exception as exc:
            return web.json_response(
                {"statement_id": statement_id, "status": {"state": "FAILED", "error": {"message": str(exc)}}}
            )
        return web.json_response(
            {
                "statement_id": statement_id,
                "status": {"state": "SUCCEEDED"},
                "manifest": {"format": "JSON_ARRAY", "schema": {"column_count": 1, "columns": [
                    {"name": "result", "type_name": fn.returns, "type_text": fn.returns.lower(), "position": 0}]}},
                "result": {"chunk_index": 0, "row_offset": 0, "row_count": 1, "data_array": [[str(value)]]},
            }
        )  # fmt: skip

    def _missing_to_call(self, principal: str, function: str) -> str:
        kind = self.catalog.kind_of(principal)
        principals = [Principal(kind, principal)] if kind else []  # type: ignore[arg-type]
        catalog, schema, _ = function.split(".")
        held = {d.privilege for d in self.catalog.effective_detail(principals, function)}
        held_schema = {d.privilege for d in self.catalog.effective_detail(principals, f"{catalog}.{schema}")}
        held_catalog = {d.privilege for d in self.catalog.effective_detail(principals, catalog)}
        for privilege, where, have in (
            ("USE CATALOG", catalog, held_catalog), ("USE SCHEMA", f"{catalog}.{schema}", held_schema),
            ("EXECUTE", function, held),
        ):  # fmt: skip
            if privilege not in have and "ALL PRIVILEGES" not in have:
                return f"User does not have {privilege} on '{where}'."
        return ""

    async def scim_list(self, request: web.Request) -> web.Response:
        if (refused := self._guard(request)) is not None:
            return refused
        kind, attribute = _SCIM[request.match_info["resource"]]
        names = [p["name"] for p in self.catalog.export()["principals"] if p["kind"] == kind]
        if "filter" in request.query:
            match = _FILTER.match(request.query["filter"])
            if match is None or match.group(1) != attribute:
                return self._error(400, "INVALID_PARAMETER_VALUE", f"unsupported filter {request.query['filter']!r}")
            value = json.loads(match.group(2))
            names = [n for n in names if n == value]
        start = int(request.query.get("startIndex", "1"))
        count = int(request.query.get("count", "10000"))
        page = names[start - 1 : start - 1 + count]
        resources = [
            {"id": f"{kind}-{i + start}", **({} if self.scim_restricted else {attribute: name, "displayName": name})}
            for i, name in enumerate(page)
        ]
        return web.json_response(
            {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                "totalResults": len(names),
                "startIndex": start,
                "itemsPerPage": len(resources),
                "Resources": resources,
            }
        )

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
    app.router.add_post("/oidc/v1/token", workspace.federate)
    app.router.add_get("/api/2.0/preview/scim/v2/Me", workspace.me)
    app.router.add_get("/api/2.1/unity-catalog/effective-permissions/{type}/{name}", workspace.effective)
    app.router.add_get("/api/2.1/unity-catalog/catalogs", workspace.list_catalogs)
    app.router.add_get("/api/2.1/unity-catalog/{kind:catalogs|schemas|functions|tables}/{name}", workspace.info)
    app.router.add_post("/api/2.0/sql/statements", workspace.statement)
    app.router.add_get("/api/2.0/preview/scim/v2/{resource:Users|ServicePrincipals|Groups}", workspace.scim_list)
    async with serve_app(app) as url:
        yield workspace, url


@contextlib.contextmanager
def serve_in_thread(catalog: LocalCatalog) -> Iterator[tuple[FakeWorkspace, str]]:
    """`serve` on an event loop of its own thread, for tests whose gateway is built synchronously
    (its SDK clients read the workspace while they are constructed)."""
    import asyncio
    import threading

    served: list[tuple[FakeWorkspace, str]] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run() -> None:
        async with serve(catalog) as workspace_and_url:
            served.append(workspace_and_url)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the fake workspace did not start")
        yield served[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
