"""The policy engine contract, run against both engines: the real OPA server and the embedded one."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.policy._input import build_input
from server.policy.bundle import PolicyBundle
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import PolicyEngine
from server.policy.opa import OpaServerEngine
from server.settings import REPO_ROOT
from tests.fakes.backends import make_call, make_identity
from tests.opa import run_opa
from tools.echo import EchoTool
from tools.profile import ProfileTool
from tools.reset import ResetTool

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    shutil.copytree(REPO_ROOT / "policies", tmp_path / "policies")
    return tmp_path / "policies"


@pytest.fixture(params=["embedded", "opa"])
async def engine(request: pytest.FixtureRequest, policy_dir: Path) -> AsyncIterator[PolicyEngine]:
    bundle = PolicyBundle.from_directory(policy_dir)
    if request.param == "embedded":
        embedded = EmbeddedEngine(bundle)
        yield embedded
        await embedded.close()
        return
    with run_opa() as opa:
        server = OpaServerEngine(opa.url, bundle=bundle)
        yield server
        await server.close()


def doc(tool: Any = None, **overrides: Any) -> dict[str, Any]:
    tool = tool or EchoTool()
    values: dict[str, Any] = {"tool": tool, "tool_name": tool.spec.name, "arguments": {"text": "hi"}}
    values.update(overrides)
    return build_input(make_call(**values))


async def test_an_analyst_may_echo(engine: PolicyEngine) -> None:
    decision = await engine.decide(doc())
    assert (decision.allow, decision.reasons, decision.engine) == (True, (), engine.name)
    assert decision.policy_version == engine.policy_version


async def test_long_text_is_denied_with_the_reason(engine: PolicyEngine) -> None:
    decision = await engine.decide(doc(arguments={"text": "x" * 201}))
    assert not decision.allow
    assert decision.reasons == ("argument text must be a string of at most 200 characters",)


async def test_destructive_tools_need_admins(engine: PolicyEngine) -> None:
    analyst = await engine.decide(doc(ResetTool(), arguments={}))
    admin = await engine.decide(doc(ResetTool(), arguments={}, identity=make_identity(groups=("admins",))))
    assert not analyst.allow
    assert admin.allow


async def test_obligations_are_returned(engine: PolicyEngine) -> None:
    decision = await engine.decide(doc(ProfileTool(), arguments={"customer_id": "c-001"}))
    assert decision.obligations == {"redact_fields": ["email"], "max_result_chars": 2000}


async def test_an_invalid_input_is_denied_before_evaluation(engine: PolicyEngine) -> None:
    bad = doc()
    del bad["identity"]
    decision = await engine.decide(bad)
    assert decision.reasons == ("decision input invalid: (root): 'identity' is a required property",)


async def test_a_broken_edit_is_refused_and_the_last_good_policy_keeps_deciding(
    engine: PolicyEngine, policy_dir: Path
) -> None:
    before = engine.policy_version
    rego = policy_dir / "castellan" / "gateway.rego"
    rego.write_text(rego.read_text().replace("count(deny) == 0", "count(deny) == "))
    report = await engine.load(PolicyBundle.from_directory(policy_dir))
    assert not report.loaded
    assert "castellan/gateway.rego" in report.errors[0]
    assert engine.policy_version == before
    assert (await engine.decide(doc())).allow
    assert not (await engine.decide(doc(arguments={"text": "x" * 201}))).allow


async def test_a_good_edit_is_swapped_in(engine: PolicyEngine, policy_dir: Path) -> None:
    # an edit its own tests accept (a loaded edit must pass the policy's *_test.rego tests)
    data = policy_dir / "castellan" / "config" / "data.json"
    data.write_text(data.read_text().replace('["drop table"]', '["drop table", "four"]'))
    report = await engine.load(PolicyBundle.from_directory(policy_dir))
    assert report.loaded
    assert engine.policy_version == report.policy_version
    decision = await engine.decide(doc(arguments={"text": "four"}))
    assert decision.reasons == ('argument text contains blocked text "four"',)
