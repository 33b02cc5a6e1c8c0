"""Unity Catalog semantics, table-driven: the same cases, the same answers, for the local catalog
and for Databricks (through databricks-sdk against a fake that speaks the real REST API).

Each case names who calls (principals: agent, subject, token groups), what they reach (a function
call or table reads), extra changes to the base catalog (grant, revoke, membership, owner), and the
exact privileges reported missing (empty: allowed). Each name the caller gives takes the kind the
catalog registers it with (`identity_for`), as a token would carry it: a user as the subject, a
service principal as the agent, a group in `groups`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.grants.cache import CachedGrants
from server.grants.local import LocalCatalog
from server.grants.source import GrantSource, function_requirements, holds, table_requirements
from server.identity import Identity
from tests.fakes import databricks_uc

pytestmark = pytest.mark.anyio


def base_catalog(catalog: LocalCatalog) -> None:
    """main (owner platform-admins): tools (owner tools-owner: echo owned by alice, sql) and sales
    (owner sales-lead: orders, customers); hr (owner hr-admins): people (salaries, lookup). Every
    principal the cases name is registered with its kind (Unity Catalog grants only to principals
    that exist)."""
    for name, kind in [
        ("alice", "user"),
        ("bob", "user"),
        ("carol", "user"),
        ("dave", "user"),
        ("erin", "user"),
        ("nina", "user"),
        ("tools-owner", "user"),
        ("sales-lead", "user"),
        ("analysts", "group"),
        ("data-users", "group"),
        ("sales", "group"),
        ("hr-team", "group"),
        ("platform-admins", "group"),
        ("hr-admins", "group"),
        ("g1", "group"),
        ("g2", "group"),
        ("g3", "group"),
        ("bot-1", "service_principal"),
        ("bot-2", "service_principal"),
        ("zed", "service_principal"),
    ]:
        catalog.add_principal(name, kind)
    for kind, name, owner in [
        ("CATALOG", "main", "platform-admins"),
        ("SCHEMA", "main.tools", "tools-owner"),
        ("FUNCTION", "main.tools.echo", "alice"),
        ("FUNCTION", "main.tools.sql", None),
        ("SCHEMA", "main.sales", "sales-lead"),
        ("TABLE", "main.sales.orders", None),
        ("TABLE", "main.sales.customers", None),
        ("CATALOG", "hr", "hr-admins"),
        ("SCHEMA", "hr.people", None),
        ("TABLE", "hr.people.salaries", None),
        ("FUNCTION", "hr.people.lookup", None),
    ]:
        catalog.add_securable(kind, name, owner)
    for member, group in [("analysts", "data-users"), ("bot-1", "analysts"), ("carol", "sales")]:
        catalog.add_member(member, group)
    catalog.grant_many(
        [
            ("data-users", "USE CATALOG", "main"),
            ("analysts", "USE SCHEMA", "main.tools"),
            ("analysts", "EXECUTE", "main.tools"),
            ("sales", "USE SCHEMA", "main.sales"),
            ("sales", "SELECT", "main.sales.orders"),
            ("bob", "ALL PRIVILEGES", "hr"),
            ("hr-team", "USE CATALOG", "hr"),
            ("hr-team", "USE SCHEMA", "hr.people"),
            ("hr-team", "SELECT", "hr.people.salaries"),
            ("account users", "BROWSE", "main"),
            ("dave", "EXECUTE", "main.tools.sql"),
            ("bot-2", "USE CATALOG", "main"),
        ]
    )


@dataclass(frozen=True)
class Case:
    id: str
    who: Sequence[str]  # agent, then subject and token groups
    function: str | None = None
    tables: Sequence[str] = ()
    ops: Sequence[tuple[str, ...]] = ()
    missing: Sequence[str] = ()


ALL3 = ("USE CATALOG on main", "USE SCHEMA on main.tools", "EXECUTE on main.tools.echo")
SALES_VIA_GROUP = (("member", "sales", "data-users"),)
CASES = [
    Case("nested-group-and-schema-grant-allow", ["bot-1"], "main.tools.echo"),
    Case("schema-execute-covers-every-function", ["bot-1"], "main.tools.sql"),
    Case(
        "nothing-in-another-catalog",
        ["bot-1"],
        "hr.people.lookup",
        missing=["USE CATALOG on hr", "USE SCHEMA on hr.people", "EXECUTE on hr.people.lookup"],
    ),
    Case(
        "no-select-no-use-schema",
        ["bot-1"],
        tables=["main.sales.orders"],
        missing=["USE SCHEMA on main.sales", "SELECT on main.sales.orders"],
    ),
    Case("use-catalog-is-required", ["carol"], tables=["main.sales.orders"], missing=["USE CATALOG on main"]),
    Case("group-joins-group-then-allowed", ["carol"], tables=["main.sales.orders"], ops=SALES_VIA_GROUP),
    Case(
        "select-on-a-sibling-table-does-not-leak",
        ["carol"],
        tables=["main.sales.customers"],
        ops=SALES_VIA_GROUP,
        missing=["SELECT on main.sales.customers"],
    ),
    Case(
        "function-owner-lacks-parents",
        ["alice"],
        "main.tools.echo",
        missing=["USE CATALOG on main", "USE SCHEMA on main.tools"],
    ),
    Case("token-group-gives-the-rest", ["alice", "analysts"], "main.tools.echo"),
    Case(
        "schema-owner-not-owner-of-children",
        ["tools-owner"],
        "main.tools.sql",
        missing=["USE CATALOG on main", "EXECUTE on main.tools.sql"],
    ),
    Case(
        "catalog-owner-not-owner-of-children",
        ["platform-admins"],
        "main.tools.echo",
        missing=["USE SCHEMA on main.tools", "EXECUTE on main.tools.echo"],
    ),
    Case("all-privileges-on-catalog-covers-functions", ["bob"], "hr.people.lookup"),
    Case("all-privileges-on-catalog-covers-tables", ["bob"], tables=["hr.people.salaries"]),
    Case("all-privileges-elsewhere-does-not-help", ["bob"], "main.tools.echo", missing=ALL3),
    Case("group-from-token", ["erin", "hr-team"], tables=["hr.people.salaries"]),
    Case(
        "group-from-token-no-execute", ["erin", "hr-team"], "hr.people.lookup", missing=["EXECUTE on hr.people.lookup"]
    ),
    Case(
        "direct-execute-without-use",
        ["dave"],
        "main.tools.sql",
        missing=["USE CATALOG on main", "USE SCHEMA on main.tools"],
    ),
    Case("direct-execute-is-per-function", ["dave"], "main.tools.echo", missing=ALL3),
    Case("stranger-has-nothing", ["zed"], "main.tools.echo", missing=ALL3),
    Case(
        "account-users-browse-is-not-use",
        ["zed"],
        tables=["main.sales.orders"],
        missing=["USE CATALOG on main", "USE SCHEMA on main.sales", "SELECT on main.sales.orders"],
    ),
    Case(
        "revoke-execute-from-group",
        ["bot-1"],
        "main.tools.echo",
        ops=[("revoke", "EXECUTE", "main.tools", "analysts")],
        missing=["EXECUTE on main.tools.echo"],
    ),
    Case(
        "revoke-use-schema",
        ["bot-1"],
        "main.tools.echo",
        ops=[("revoke", "USE SCHEMA", "main.tools", "analysts")],
        missing=["USE SCHEMA on main.tools"],
    ),
    Case("leave-group", ["bot-1"], "main.tools.echo", ops=[("unmember", "bot-1", "analysts")], missing=ALL3),
    Case(
        "use-schema-on-catalog-reaches-every-schema",
        ["bot-2"],
        tables=["main.sales.orders"],
        ops=[("grant", "USE SCHEMA", "main", "bot-2")],
        missing=["SELECT on main.sales.orders"],
    ),
    Case(
        "use-schema-on-catalog-then-execute-missing",
        ["bot-2"],
        "main.tools.echo",
        ops=[("grant", "USE SCHEMA", "main", "bot-2")],
        missing=["EXECUTE on main.tools.echo"],
    ),
    Case(
        "select-on-schema-covers-its-tables",
        ["bot-2"],
        tables=["main.sales.orders", "main.sales.customers"],
        ops=[("grant", "USE SCHEMA", "main.sales", "bot-2"), ("grant", "SELECT", "main.sales", "bot-2")],
    ),
    Case(
        "all-privileges-on-schema",
        ["bot-2"],
        tables=["main.sales.customers"],
        ops=[("grant", "ALL PRIVILEGES", "main.sales", "bot-2")],
    ),
    Case(
        "all-privileges-on-schema-not-sibling",
        ["bot-2"],
        "main.tools.echo",
        ops=[("grant", "ALL PRIVILEGES", "main.sales", "bot-2")],
        missing=["USE SCHEMA on main.tools", "EXECUTE on main.tools.echo"],
    ),
    Case(
        "table-owner-reads-it",
        ["carol"],
        tables=["main.sales.customers"],
        ops=[*SALES_VIA_GROUP, ("owner", "main.sales.customers", "carol")],
    ),
    Case(
        "owning-a-table-gives-no-parent",
        ["carol"],
        tables=["main.sales.customers"],
        ops=[("owner", "main.sales.customers", "carol")],
        missing=["USE CATALOG on main"],
    ),
    Case(
        "account-users-grant-applies-to-all",
        ["zed"],
        "main.tools.echo",
        ops=[("grant", "EXECUTE", "main.tools.echo", "account users")],
        missing=["USE CATALOG on main", "USE SCHEMA on main.tools"],
    ),
    Case(
        "account-users-full-path",
        ["zed"],
        "main.tools.echo",
        ops=[
            ("grant", "USE CATALOG", "main", "account users"),
            ("grant", "USE SCHEMA", "main.tools", "account users"),
            ("grant", "EXECUTE", "main.tools.echo", "account users"),
        ],
    ),
    Case(
        "three-level-nesting",
        ["nina"],
        "main.tools.echo",
        ops=[
            ("member", "nina", "g3"),
            ("member", "g3", "g2"),
            ("member", "g2", "g1"),
            ("grant", "USE CATALOG", "main", "g1"),
            ("grant", "USE SCHEMA", "main.tools", "g1"),
            ("grant", "EXECUTE", "main.tools.echo", "g1"),
        ],
    ),
    Case(
        "three-level-nesting-other-function",
        ["nina"],
        "main.tools.sql",
        ops=[
            ("member", "nina", "g3"),
            ("member", "g3", "g2"),
            ("member", "g2", "g1"),
            ("grant", "USE CATALOG", "main", "g1"),
            ("grant", "USE SCHEMA", "main.tools", "g1"),
            ("grant", "EXECUTE", "main.tools.echo", "g1"),
        ],
        missing=["EXECUTE on main.tools.sql"],
    ),
    Case(
        "membership-cycle-terminates",
        ["nina"],
        "main.tools.echo",
        ops=[
            ("member", "nina", "g3"),
            ("member", "g3", "g2"),
            ("member", "g2", "g1"),
            ("member", "g1", "g3"),
            ("grant", "USE CATALOG", "main", "g1"),
            ("grant", "USE SCHEMA", "main.tools", "g2"),
            ("grant", "EXECUTE", "main.tools.echo", "g3"),
        ],
    ),
    Case(
        "subject-ownership-counts-for-the-agent",
        ["bot-9", "alice"],
        "main.tools.echo",
        missing=["USE CATALOG on main", "USE SCHEMA on main.tools"],
    ),
    Case(
        "privilege-spelling-is-normalised",
        ["zed"],
        "main.tools.sql",
        ops=[
            ("grant", "use_catalog", "main", "zed"),
            ("grant", "use schema", "main.tools", "zed"),
            ("grant", "execute", "main.tools.sql", "zed"),
        ],
    ),
    Case(
        "revoking-what-was-never-granted-changes-nothing",
        ["bot-1"],
        "main.tools.echo",
        ops=[("revoke", "SELECT", "main.sales.orders", "bot-1")],
    ),
    Case(
        "revoke-all-privileges",
        ["bob"],
        tables=["hr.people.salaries"],
        ops=[("revoke", "ALL PRIVILEGES", "hr", "bob")],
        missing=["USE CATALOG on hr", "USE SCHEMA on hr.people", "SELECT on hr.people.salaries"],
    ),
    Case(
        "revoke-from-group",
        ["carol"],
        tables=["main.sales.orders"],
        ops=[*SALES_VIA_GROUP, ("revoke", "SELECT", "main.sales.orders", "sales")],
        missing=["SELECT on main.sales.orders"],
    ),
    Case(
        "group-owner-members-hold-all",
        ["erin", "hr-team"],
        "hr.people.lookup",
        ops=[("owner", "hr.people.lookup", "hr-team")],
    ),
    Case(
        "two-tables-one-missing",
        ["carol"],
        tables=["main.sales.orders", "main.sales.customers"],
        ops=SALES_VIA_GROUP,
        missing=["SELECT on main.sales.customers"],
    ),
    Case(
        "all-privileges-on-schema-needs-use-catalog",
        ["zed"],
        "main.tools.echo",
        ops=[("grant", "ALL PRIVILEGES", "main.tools", "zed")],
        missing=["USE CATALOG on main"],
    ),
    Case(
        "user-member-of-group-in-catalog",
        ["erin"],
        "hr.people.lookup",
        ops=[("member", "erin", "hr-team"), ("grant", "EXECUTE", "hr.people", "hr-team")],
    ),
    Case(
        "a-function-that-does-not-exist-holds-nothing",
        ["bot-1"],
        "main.tools.nope",
        missing=["EXECUTE on main.tools.nope"],
    ),
]


def apply(catalog: LocalCatalog, ops: Sequence[tuple[str, ...]]) -> None:
    for op, *args in ops:
        if op == "grant":
            catalog.grant(args[0], args[1], args[2])
        elif op == "revoke":
            catalog.revoke(args[0], args[1], args[2])
        elif op == "member":
            catalog.add_member(args[0], args[1])
        elif op == "unmember":
            catalog.remove_member(args[0], args[1])
        elif op == "owner":
            catalog.set_owner(args[0], args[1])
        else:
            raise AssertionError(op)


def identity_for(catalog: LocalCatalog, who: Sequence[str]) -> Identity:
    """The identity a token for `who` gives: each name as the kind the catalog has it (unregistered
    names as the agent, a service principal). A user is the subject; with no service principal named,
    the agent is an unregistered client acting for that user."""
    kinds = {name: catalog.kind_of(name) or "service_principal" for name in who}
    agents = [n for n in who if kinds[n] == "service_principal"]
    users = [n for n in who if kinds[n] == "user"]
    agent = agents[0] if agents else f"client-of-{users[0] if users else 'nobody'}"
    return Identity(
        agent_id=agent,
        subject=users[0] if users else agent,
        issuer="t",
        groups=tuple(n for n in who if kinds[n] == "group"),
        subject_kind="user" if users else "service_principal",
    )


async def missing(source: GrantSource, case: Case, catalog: LocalCatalog) -> list[str]:
    """What the grants stage checks: each requirement against the effective privileges of the
    identity's principals (agent, subject, token groups), through the cache."""
    identity = identity_for(catalog, case.who)
    needed = function_requirements(case.function) if case.function else table_requirements(case.tables)
    cache = CachedGrants(source, ttl=0)
    held = [await cache.privileges(identity.principals, r.securable_type, r.securable) for r in needed]
    return [str(r) for r, privileges in zip(needed, held, strict=True) if not holds(r, privileges)]


@pytest.fixture(params=["local", "databricks"])
async def source_for(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    catalog = LocalCatalog(tmp_path / "catalog.db")
    base_catalog(catalog)
    if request.param == "local":
        yield catalog, catalog
        return
    from databricks.sdk import WorkspaceClient

    from server.grants.databricks import DatabricksGrants

    async with databricks_uc.serve(catalog) as (_, host):
        # The SDK reads host metadata while it is constructed, synchronously: not on the loop serving the fake.
        client = await asyncio.to_thread(WorkspaceClient, host=host, token=databricks_uc.TOKEN)
        yield catalog, DatabricksGrants(client)


def test_the_table_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_unity_catalog_semantics(source_for: Any, case: Case) -> None:
    catalog, source = source_for
    apply(catalog, case.ops)
    assert await missing(source, case, catalog) == list(case.missing)


async def test_the_stage_adds_what_the_tool_derives_from_its_arguments(tmp_path: Path) -> None:
    """The SQL tool's tables come from parsing its query (`required_grants`), on top of its function."""
    from server.errors import Denied
    from server.grants.source import Requirement
    from server.grants.stage import GrantsStage
    from server.registry import ToolSpec
    from tests.fakes.backends import FakeTool, make_call, make_identity

    class Reader(FakeTool):
        def required_grants(self, arguments: Any) -> tuple[Requirement, ...]:
            return table_requirements(arguments["tables"])

    catalog = LocalCatalog(tmp_path / "catalog.db")
    base_catalog(catalog)
    reader = Reader(spec=ToolSpec(name="r", description="d", securable="main.tools.sql", input_schema={}))
    call = make_call(
        tool=reader, identity=make_identity(agent_id="bot-1", groups=()), arguments={"tables": ["main.sales.orders"]}
    )
    with pytest.raises(Denied) as denied:
        await GrantsStage(CachedGrants(catalog, ttl=0)).run(call)
    assert denied.value.reasons == (
        "missing privilege USE SCHEMA on main.sales",
        "missing privilege SELECT on main.sales.orders",
    )
