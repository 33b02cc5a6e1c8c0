"""On behalf of the user: one gateway, two users, and the Databricks workspace decides for each.

The gateway runs in-process (its real app, pipeline, embedded policy and audit outbox); the workspace
is the fake of tests/fakes/databricks_uc.py (a Databricks workspace cannot run here), speaking the
real wire format of token federation (`POST /oidc/v1/token`), SCIM `Me`, effective permissions and
statement execution. Its federation policy trusts the gateway's dev issuer, as a workspace's account
federation policy would trust the IdP that signs the agents' tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from bench.load import call_body, call_headers
from server.app import create_app
from server.audit.search import AuditQuery
from server.auth.devkeys import dev_public_keys, mint_dev_token
from server.errors import ConfigError
from server.grants import databricks_federation
from server.grants.local import LocalCatalog
from server.settings import Settings
from tests.fakes import databricks_uc
from tests.fakes.databricks_uc import FakeFunction, FakeWorkspace

BASE = "http://127.0.0.1:8750"
ALICE, BOB, MALLORY = "alice@example.com", "bob@example.com", "mallory@example.com"
NET_PRICE, WHOAMI = "sales.pricing.net_price", "sales.pricing.whoami"


def workspace_catalog(path: Path) -> LocalCatalog:
    """alice is an analyst (EXECUTE on net_price through the group); bob holds USE SCHEMA himself but
    not EXECUTE on net_price; the agent's own service principal holds EXECUTE on it, which on behalf
    of the user must not count; everyone may call whoami."""
    catalog = LocalCatalog(path)
    for name, kind in ((ALICE, "user"), (BOB, "user"), ("analysts", "group"), ("bot", "service_principal")):
        catalog.add_principal(name, kind)
    catalog.add_member(ALICE, "analysts")
    catalog.add_securable("CATALOG", "sales")
    catalog.add_securable("SCHEMA", "sales.pricing")
    for fn in (NET_PRICE, WHOAMI):
        catalog.add_securable("FUNCTION", fn)
    for privilege, securable, principal in (
        ("USE CATALOG", "sales", "account users"),
        ("USE SCHEMA", "sales.pricing", "analysts"),
        ("EXECUTE", NET_PRICE, "analysts"),
        ("USE SCHEMA", "sales.pricing", BOB),
        ("EXECUTE", WHOAMI, "account users"),
        ("EXECUTE", NET_PRICE, "bot"),
        ("USE SCHEMA", "sales.pricing", "bot"),
    ):
        catalog.grant(privilege, securable, principal)
    return catalog


@dataclass
class Rig:
    client: TestClient
    settings: Settings
    workspace: FakeWorkspace

    def token(self, subject: str, ttl: int = 3600) -> str:
        return mint_dev_token(
            self.settings.data_dir, agent="bot", issuer=self.settings.issuer, audience=self.settings.resource_url,
            subject=subject, scopes=("mcp:tools",), ttl_seconds=ttl,
        )  # fmt: skip

    def call(self, token: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/mcp", content=call_body(tool, arguments, 1), headers=call_headers(tool, token))
        text = response.text
        if "text/event-stream" in response.headers.get("content-type", ""):
            text = [line[5:] for line in text.splitlines() if line.startswith("data:")][-1]
        result = json.loads(text)["result"]
        assert isinstance(result, dict)
        return result


def _body(result: dict[str, Any]) -> Any:
    return json.loads(result["content"][0]["text"])


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    catalog = workspace_catalog(tmp_path / "workspace.db")
    with databricks_uc.serve_in_thread(catalog) as (workspace, host):
        workspace.functions[NET_PRICE] = FakeFunction(
            params=[("gross", "DOUBLE", "Price with tax"), ("rate", "DOUBLE", "Tax rate")],
            returns="DOUBLE",
            comment="Net price.",
            body=lambda gross, rate: round(gross / (1 + rate), 2),
        )
        workspace.functions[WHOAMI] = FakeFunction(
            params=[],
            returns="STRING",
            comment="Who runs this.",
            body=lambda current_user: current_user,
            with_user=True,
        )
        monkeypatch.setenv("DATABRICKS_HOST", host)
        monkeypatch.setenv("DATABRICKS_TOKEN", databricks_uc.TOKEN)  # the gateway's own: definitions at start-up
        settings = Settings(
            data_dir=tmp_path / "gw",
            audit={"ship": False},
            policy={"engine": "embedded", "reload": False, "decision_log": False},
            grants={
                "backend": "databricks",
                "databricks_host": host,
                "databricks_identity": "on_behalf_of_user",
                "cache_ttl_seconds": 0,
                "max_stale_seconds": 0,
            },
            tools={
                "databricks_functions": [NET_PRICE, WHOAMI],
                "databricks_warehouse_id": "wh-1",
                "databricks_identity": "on_behalf_of_user",
            },
        )
        workspace.federation_keys = dev_public_keys(settings.data_dir)
        workspace.federation_issuer = settings.issuer
        workspace.federation_audience = settings.resource_url
        with TestClient(create_app(settings), base_url=BASE) as client:
            yield Rig(client, settings, workspace)


def test_two_users_through_one_gateway_get_the_workspaces_own_decisions_and_results(rig: Rig) -> None:
    alice, bob = rig.token(ALICE), rig.token(BOB)

    assert rig.call(alice, NET_PRICE, {"gross": 120.0, "rate": 0.2})["structuredContent"] == {"result": 100.0}
    denied = rig.call(bob, NET_PRICE, {"gross": 120.0, "rate": 0.2})
    assert denied["isError"] is True
    assert _body(denied)["stage"] == "grants"  # the agent's own service principal holds EXECUTE: it does not count
    assert _body(denied)["reasons"] == [f"missing privilege EXECUTE on {NET_PRICE}"]

    # the statement runs as each caller: the workspace's current_user() is theirs
    assert rig.call(alice, WHOAMI, {})["structuredContent"] == {"result": ALICE}
    assert rig.call(bob, WHOAMI, {})["structuredContent"] == {"result": BOB}

    # one federation per user, its token cached for the calls after it
    federated = [f["subject_token"] for f in rig.workspace.federations]
    assert sorted(federated) == sorted([alice, bob]), [(f["subject_token"] == alice) for f in rig.workspace.federations]
    for form in rig.workspace.federations:
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
        assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
        assert form["scope"] == "all-apis"


def test_the_wire_to_unity_catalog_carries_the_federated_tokens_never_the_agents(rig: Rig) -> None:
    alice, bob = rig.token(ALICE), rig.token(BOB)
    rig.workspace.authorizations.clear()  # what start-up read (the definitions, as the gateway)
    rig.call(alice, NET_PRICE, {"gross": 10.0, "rate": 0.0})
    rig.call(bob, WHOAMI, {})

    seen = rig.workspace.authorizations
    paths = {path for path, _ in seen}
    assert "/api/2.1/unity-catalog/effective-permissions/function/sales.pricing.net_price" in paths
    assert "/api/2.0/sql/statements" in paths
    issued = {f"Bearer {token}": who for token, who in rig.workspace.issued.items()}
    for path, header in seen:
        assert header in issued, (path, header)  # neither the agent's JWT nor the gateway's own token
        assert alice not in header
        assert bob not in header
    assert set(issued.values()) == {ALICE, BOB}


def test_a_token_the_workspace_will_not_federate_is_denied_with_the_reason_audited(rig: Rig) -> None:
    mallory = rig.token(MALLORY)  # a valid gateway token, but no principal of the workspace
    denied = rig.call(mallory, WHOAMI, {})
    assert denied["isError"] is True
    body = _body(denied)
    assert body["stage"] == "credentials"
    assert "refused to federate the caller's token: invalid_grant" in body["reasons"][0]
    assert not [p for p, h in rig.workspace.authorizations if "statements" in p and h.endswith(mallory)]

    outbox = rig.client.app.state.gateway.outbox  # type: ignore[attr-defined]
    (record,) = [r for r in outbox.search(AuditQuery(subject=MALLORY, tool=WHOAMI)) if r.get("decision") == "deny"]
    assert "refused to federate" in json.dumps(record)


def test_a_federated_token_the_workspace_revoked_denies_once_and_an_expiring_one_is_renewed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = rig.token(ALICE)
    assert rig.call(alice, WHOAMI, {})["structuredContent"] == {"result": ALICE}
    rig.workspace.issued.clear()  # the workspace no longer honours the token the gateway cached
    denied = rig.call(alice, WHOAMI, {})
    assert _body(denied)["stage"] == "credentials"
    assert _body(denied)["reasons"] == [
        "databricks on-behalf-of-user: the workspace refused the caller's Databricks token"
    ]
    assert rig.call(alice, WHOAMI, {})["structuredContent"] == {"result": ALICE}  # federated afresh

    rig.workspace.federated_lifetime = 120  # the gateway uses it for 60 s, until the leeway before expiry
    rig.workspace.issued.clear()
    assert rig.call(alice, WHOAMI, {})["isError"] is True
    assert rig.call(alice, WHOAMI, {})["structuredContent"] == {"result": ALICE}
    later = time.time() + 61  # the gateway's clock moves past that point; the token is still valid
    monkeypatch.setattr(databricks_federation, "time", SimpleNamespace(time=lambda: later))
    before = len(rig.workspace.federations)
    assert rig.call(alice, WHOAMI, {})["structuredContent"] == {"result": ALICE}
    assert len(rig.workspace.federations) == before + 1  # renewed before it expired, not refused


def test_policy_sees_that_a_function_runs_on_behalf_of_the_user(rig: Rig) -> None:
    from server.policy._input import build_input
    from tests.fakes.backends import make_call, make_identity

    tool = rig.client.app.state.gateway.registry.get(WHOAMI)  # type: ignore[attr-defined]
    document = build_input(make_call(tool=tool, identity=make_identity()))
    assert document["upstream"] == {"name": "databricks", "credential": "on_behalf_of_user"}


def test_on_behalf_of_user_grants_need_the_databricks_backend_and_its_host() -> None:
    with pytest.raises((ConfigError, ValueError), match=r"needs grants\.backend = 'databricks'"):
        Settings(grants={"databricks_identity": "on_behalf_of_user"})
    with pytest.raises((ConfigError, ValueError), match=r"needs grants\.databricks_host"):
        Settings(grants={"backend": "databricks", "databricks_identity": "on_behalf_of_user"})
    with pytest.raises((ConfigError, ValueError)):
        Settings(grants={"databricks_identity": "as_whoever"})


def test_federations_share_one_pooled_session_that_closes_with_the_gateway(rig: Rig) -> None:
    gateway = rig.client.app.state.gateway  # type: ignore[attr-defined]
    assert rig.call(rig.token(ALICE), WHOAMI, {})["structuredContent"] == {"result": ALICE}
    assert rig.call(rig.token(BOB), WHOAMI, {})["structuredContent"] == {"result": BOB}
    endpoint = gateway.on_behalf.federation._endpoint
    session = endpoint._session
    assert session is not None  # both users federated over the one kept session
    assert not session.closed
    rig.client.__exit__(None, None, None)  # the gateway shuts down
    assert session.closed
    assert endpoint._closed
