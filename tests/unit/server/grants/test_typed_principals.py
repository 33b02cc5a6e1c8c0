"""A name never crosses kinds: a token whose agent, subject or group is named like a principal of
another kind gets nothing of that principal's grants, on both backends (local catalog, and Unity
Catalog through databricks-sdk against the fake workspace), through the grants cache, and in the
policy input. Tokens are verified by the real `JwtVerifier`, so the claim-to-kind mapping is the one
docs/grants.md states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.auth.verifier import JwtVerifier
from server.errors import ConfigError
from server.grants.cache import CachedGrants
from server.grants.local import LocalCatalog
from server.grants.source import function_requirements, holds, table_requirements
from server.identity import Identity, group, service_principal, user
from server.settings import ClaimNames
from tests.unit.server.auth.test_verifier import claims, sign, verifier
from tests.unit.server.grants.test_semantics import ALL3, base_catalog, source_for

pytestmark = pytest.mark.anyio
__all__ = ["source_for"]  # the two-backend fixture of the 45-case table


async def identity(subject_kind: str = "auto", **token: Any) -> Identity:
    v: JwtVerifier = verifier(claims=ClaimNames(subject_kind=subject_kind))  # type: ignore[arg-type]
    return await v.verify(sign(claims(**token)))


async def missing(source: Any, who: Identity, function: str | None = None, tables: tuple[str, ...] = ()) -> list[str]:
    needed = function_requirements(function) if function else table_requirements(tables)
    cache = CachedGrants(source, ttl=0)
    held = [await cache.privileges(who.principals, r.securable_type, r.securable) for r in needed]
    return [str(r) for r, p in zip(needed, held, strict=True) if not holds(r, p)]


# (token claims, what it reaches, missing). In the base catalog `analysts`, `data-users`, `hr-team`,
# `platform-admins` are groups; `alice`, `bob` users; `bot-1` a service principal in `analysts`.
BOT = {"agent_id": "bot-9", "sub": "bot-9"}  # an agent with no grants of its own
CROSSINGS = [
    # The finding: an agent id equal to a group's name received the group's grants (here: all of them).
    ("agent-id-named-like-a-group", {"agent_id": "analysts", "sub": "analysts"}, "main.tools.echo", ALL3),
    ("subject-named-like-a-group", {"agent_id": "bot-9", "sub": "analysts"}, "main.tools.echo", ALL3),
    ("agent-named-like-an-owning-group", {"agent_id": "platform-admins", "sub": None}, "main.tools.echo", ALL3),
    # ... and the other way round: a group claim named like a user or a service principal.
    ("group-named-like-a-user", {**BOT, "groups": ["bob"]}, ("hr.people.salaries",), [
        "USE CATALOG on hr", "USE SCHEMA on hr.people", "SELECT on hr.people.salaries"]),
    ("group-named-like-a-service-principal", {**BOT, "groups": ["bot-1"]}, "main.tools.echo", ALL3),
    # A client id named like a user is not that user: alice's ownership of echo is not the agent's.
    ("agent-named-like-an-owning-user", {"agent_id": "alice", "sub": "alice"}, "main.tools.echo", ALL3),
    # The same names in their own kinds do get their grants.
    ("a-group-claim-gets-the-group", {**BOT, "groups": ["analysts"]}, "main.tools.echo", []),
    ("a-user-subject-gets-the-user", {"agent_id": "bot-9", "sub": "bob"}, ("hr.people.salaries",), []),
    ("an-agent-gets-the-service-principal", {"agent_id": "bot-1", "sub": "bot-1"}, "main.tools.echo", []),
    ("a-user-subject-owns-what-the-user-owns", {"agent_id": "bot-9", "sub": "alice"}, "main.tools.echo",
     ["USE CATALOG on main", "USE SCHEMA on main.tools"]),
    # A token with only `sub` (no agent claim): the subject is the agent, typed by the subject rule.
    ("sub-only-token-is-its-subject", {"agent_id": None, "sub": "bot-1"}, "main.tools.echo", []),
]  # fmt: skip


@pytest.mark.parametrize(("case", "token", "reach", "expected"), CROSSINGS, ids=[c[0] for c in CROSSINGS])
async def test_a_name_never_crosses_kinds(source_for: Any, case: str, token: Any, reach: Any, expected: Any) -> None:
    _, source = source_for
    who = await identity(**token)
    if isinstance(reach, tuple):
        assert await missing(source, who, tables=reach) == list(expected)
    else:
        assert await missing(source, who, reach) == list(expected)


async def test_a_subject_configured_as_a_service_principal_is_one(source_for: Any) -> None:
    _, source = source_for
    who = await identity("service_principal", agent_id=None, azp="web-app", sub="bot-1")
    assert who.principals == (service_principal("web-app"), service_principal("bot-1"))
    assert await missing(source, who, "main.tools.echo") == []


def test_the_claims_map_to_kinds_as_documented() -> None:
    who = Identity(agent_id="bot-9", subject="alice@example.com", issuer="t", groups=("analysts", "ops"))
    assert who.principals == (
        service_principal("bot-9"),
        user("alice@example.com"),
        group("analysts"),
        group("ops"),
    )
    same = Identity(agent_id="bot-9", subject="bot-9", issuer="t")
    assert same.principals == (service_principal("bot-9"),)


async def test_the_cache_keeps_kinds_apart(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path / "c.db")
    base_catalog(catalog)
    cache = CachedGrants(catalog, ttl=3600)
    as_group = await cache.privileges([group("analysts")], "SCHEMA", "main.tools")
    as_agent = await cache.privileges([service_principal("analysts")], "SCHEMA", "main.tools")
    assert "EXECUTE" in as_group
    assert "EXECUTE" not in as_agent  # not the group's cached answer


async def test_the_policy_input_names_each_principal_with_its_kind() -> None:
    from server.policy._input import build_input, schema_errors
    from tests.fakes.backends import FakeTool, make_call

    who = await identity(agent_id="bot-9", sub="alice", groups=["analysts"])
    document = build_input(make_call(tool=FakeTool(), identity=who))
    assert schema_errors(document) == []
    assert document["identity"]["subject_type"] == "user"
    assert document["identity"]["principals"] == [
        {"type": "service_principal", "name": "bot-9"},
        {"type": "user", "name": "alice"},
        {"type": "group", "name": "analysts"},
    ]


def test_the_catalog_refuses_names_of_unknown_or_another_kind(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path / "c.db")
    base_catalog(catalog)
    with pytest.raises(ConfigError, match=r"no principal 'mallory' to be a grantee: register it first"):
        catalog.grant("EXECUTE", "main.tools.echo", "mallory")
    with pytest.raises(ConfigError, match=r"'analysts' is already a group; a name has one kind"):
        catalog.add_principal("analysts", "service_principal")
    with pytest.raises(ConfigError, match=r"'alice' is a user, not a group"):
        catalog.add_member("bob", "alice")
    with pytest.raises(ConfigError, match=r"no principal 'mallory' to be an owner"):
        catalog.set_owner("main.tools.echo", "mallory")
    with pytest.raises(ConfigError, match="implicit group"):
        catalog.add_principal("account users", "user")
    catalog.add_principal("analysts", "group")  # the same kind again: harmless
    catalog.grant("EXECUTE", "main.tools.echo", "account users")  # the implicit group needs no registering


def test_names_left_unregistered_by_an_older_catalog_hold_nothing_and_are_listed(tmp_path: Path) -> None:
    import sqlite3

    catalog = LocalCatalog(tmp_path / "c.db")
    base_catalog(catalog)
    with sqlite3.connect(tmp_path / "c.db") as raw:  # as a catalog written before kinds were enforced
        raw.execute("INSERT INTO grants VALUES ('legacy-bot', 'EXECUTE', 'main.tools.echo')")
    assert catalog.unregistered() == ["legacy-bot"]
    held = catalog.effective_detail([service_principal("legacy-bot")], "main.tools.echo")
    assert "EXECUTE" not in {h.privilege for h in held}


async def test_a_name_with_quotes_and_spaces_is_looked_up_exactly(source_for: Any) -> None:
    """The SCIM filter carries the name as a JSON string: quotes cannot end it early or widen it."""
    catalog, source = source_for
    name = 'on-call "night" \\ team'
    catalog.add_principal(name, "group")
    catalog.add_principal("on-call", "group")
    for privilege, securable in [("USE CATALOG", "main"), ("USE SCHEMA", "main.tools"), ("EXECUTE", "main.tools")]:
        catalog.grant(privilege, securable, name)
    member = Identity(agent_id="bot-9", subject="bot-9", issuer="t", groups=(name,))
    assert await missing(source, member, "main.tools.echo") == []
    near = Identity(agent_id="bot-9", subject="bot-9", issuer="t", groups=("on-call",))
    assert await missing(source, near, "main.tools.echo") == list(ALL3)
    agent = Identity(agent_id=name, subject=name, issuer="t")
    assert await missing(source, agent, "main.tools.echo") == list(ALL3)


async def test_databricks_confirms_kinds_for_a_non_admin_view_too(tmp_path: Path) -> None:
    """A gateway whose credentials are not a workspace admin sees SCIM entries without their names:
    the filter's single answer still confirms a principal, and a name of another kind still gets nothing."""
    import asyncio

    from databricks.sdk import WorkspaceClient

    from server.grants.databricks import DatabricksGrants
    from tests.fakes import databricks_uc

    catalog = LocalCatalog(tmp_path / "c.db")
    base_catalog(catalog)
    async with databricks_uc.serve(catalog) as (workspace, host):
        workspace.scim_restricted = True
        client = await asyncio.to_thread(WorkspaceClient, host=host, token=databricks_uc.TOKEN)
        source = DatabricksGrants(client)
        assert await missing(source, Identity("bot-9", "bot-9", "t", groups=("analysts",)), "main.tools.echo") == []
        assert await missing(source, Identity("analysts", "analysts", "t"), "main.tools.echo") == list(ALL3)
        assert await missing(source, Identity("bot-9", "bob", "t"), tables=("hr.people.salaries",)) == []


def test_an_identitys_principals_are_computed_once_and_do_not_change_what_it_equals() -> None:
    from dataclasses import replace

    from tests.fakes.backends import make_identity

    identity = make_identity(groups=("analysts", "admins"))
    assert identity.principals is identity.principals  # remembered
    fresh = make_identity(groups=("analysts", "admins"))
    assert identity == fresh
    assert hash(identity) == hash(fresh)
    other = replace(identity, groups=("admins",))
    assert [str(p) for p in other.principals] == ["service principal agent-1", "user alice", "group admins"]
