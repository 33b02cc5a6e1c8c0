from __future__ import annotations

import pytest

from server.auth.stage import AuthenticateStage
from server.call import RunInfo
from server.errors import BackendUnavailable, Denied
from server.metering.stage import AdmitStage, ChargeStage, call_key
from server.policy.engine import Decision
from server.policy.stage import PolicyStage
from server.registry import ToolOutput
from server.settings import Limits
from server.testing import MemoryMeter, StaticPolicy, make_call, make_identity

pytestmark = pytest.mark.anyio


async def test_authenticate_denies_a_call_without_identity() -> None:
    with pytest.raises(Denied, match="no authenticated identity"):
        await AuthenticateStage().run(make_call(identity=None))


async def test_authenticate_denies_missing_required_scopes() -> None:
    stage = AuthenticateStage(["mcp:tools"])
    with pytest.raises(Denied, match="token lacks scope 'mcp:tools'"):
        await stage.run(make_call())
    await stage.run(make_call(identity=make_identity(scopes=("mcp:tools",))))


async def test_admit_records_the_budget_it_saw() -> None:
    call = await AdmitStage(MemoryMeter(), Limits(tokens_per_day=500)).run(make_call())
    assert call.budget is not None
    assert (call.budget.tokens_limit, call.budget.run_calls) == (500, 1)


async def test_admit_fails_closed_when_the_meter_is_down() -> None:
    with pytest.raises(BackendUnavailable, match="meter store unavailable"):
        await AdmitStage(MemoryMeter(down=True), Limits()).run(make_call())


async def test_charge_counts_arguments_and_result() -> None:
    meter = MemoryMeter()
    call = await ChargeStage(meter).run(make_call(arguments={"q": "x" * 40}, output=ToolOutput(text="y" * 80)))
    assert (call.tokens_in, call.tokens_out) == (12, 20)
    assert meter.tokens["agent-1"] == 32


def test_the_repeat_key_ignores_argument_order_but_not_values() -> None:
    assert call_key("t", {"a": 1, "b": 2}) == call_key("t", {"b": 2, "a": 1})
    assert call_key("t", {"a": 1}) != call_key("t", {"a": 2})
    assert call_key("t", {"a": 1}) != call_key("u", {"a": 1})


async def test_policy_stage_denies_with_the_policy_reasons_and_keeps_the_decision() -> None:
    decision = Decision(allow=False, reasons=("no",), policy_version="v9")
    with pytest.raises(Denied) as denied:
        await PolicyStage(StaticPolicy(decision)).run(make_call(run=RunInfo(run_id="r")))
    assert denied.value.reasons == ("no",)
    assert denied.value.decision is decision


async def test_policy_stage_fails_closed_when_the_engine_is_down() -> None:
    with pytest.raises(BackendUnavailable, match="policy engine unavailable"):
        await PolicyStage(StaticPolicy(down=True)).run(make_call())
