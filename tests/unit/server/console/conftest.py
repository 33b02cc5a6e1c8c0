"""A gateway app (in-process, embedded policy, no shipping) with its console, and records written to its
real outbox, for the console's HTTP tests."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.audit.outbox import SqliteOutbox
from server.audit.records import decision_record, outcome_record
from server.auth.devkeys import mint_dev_token
from server.call import RunInfo
from server.errors import Denied
from server.registry import ToolOutput
from server.settings import Settings
from tests.fakes.backends import allowed, make_call, make_identity

BASE = "http://127.0.0.1:8750"


@dataclass
class ConsoleRig:
    client: TestClient
    settings: Settings

    @property
    def outbox(self) -> SqliteOutbox:
        outbox = self.client.app.state.gateway.outbox  # type: ignore[attr-defined]
        assert isinstance(outbox, SqliteOutbox)
        return outbox

    def token(self, *scopes: str, agent: str = "auditor", groups: tuple[str, ...] = ()) -> str:
        return mint_dev_token(
            self.settings.data_dir, agent=agent, issuer=self.settings.issuer, audience=self.settings.resource_url,
            scopes=scopes, subject=f"{agent}@example.com", groups=groups,
        )  # fmt: skip

    def csrf(self, page: str) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, page[:500]
        return found.group(1)

    def sign_in(self, *scopes: str, agent: str = "auditor", groups: tuple[str, ...] = ()) -> Any:
        page = self.client.get("/console/sign-in").text
        return self.client.post(
            "/console/sign-in",
            data={"token": self.token(*scopes, agent=agent, groups=groups), "csrf": self.csrf(page)},
            headers={"origin": BASE},
            follow_redirects=False,
        )

    def record(
        self,
        *,
        agent: str = "agent-1",
        tool: str = "fake",
        denied: str | None = None,
        stage: str = "policy",
        run_id: str = "run-1",
        groups: tuple[str, ...] = ("analysts",),
        arguments: dict[str, Any] | None = None,
        action: str = "call",
        policy_version: str = "v1",
        tokens: int = 10,
        shadow: dict[str, Any] | None = None,
    ) -> str:
        """One call's records in the gateway's own outbox: a decision, and an outcome when allowed.
        `shadow`: what a shadow policy said (in the decision record of a refusal, the outcome's otherwise)."""
        call = make_call(
            tool_name=tool, identity=make_identity(agent_id=agent, groups=groups), run=RunInfo(run_id=run_id),
            arguments=arguments or {"q": "hello"}, action=action,
        )  # fmt: skip
        call = allowed(call)
        call = replace(call, decision=replace(call.decision, policy_version=policy_version))  # type: ignore[arg-type]
        if denied:
            call = replace(call, error=Denied(stage, denied))
            if shadow is not None:
                call = replace(call, decision=replace(call.decision, allow=False, shadow=shadow))  # type: ignore[arg-type]
        elif shadow is not None:
            call = replace(call, shadow=shadow)
        portal = self.client.portal  # type: ignore[attr-defined]
        portal.call(self.outbox.write, "decision", call.call_id, decision_record(call))
        if not denied:
            done = replace(call, output=ToolOutput(text="fine"), tokens_in=tokens, tokens_out=tokens)
            portal.call(self.outbox.write, "outcome", call.call_id, outcome_record(done, time.time()))
        return call.call_id


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[ConsoleRig]:
    settings = Settings(
        data_dir=tmp_path / "gw",
        audit={"ship": False, "checkpoint_interval_seconds": 0.05},
        policy={"engine": "embedded", "reload": False, "decision_log": False},
    )
    with TestClient(create_app(settings), base_url=BASE) as client:
        yield ConsoleRig(client, settings)
