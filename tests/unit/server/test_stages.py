from __future__ import annotations

from dataclasses import replace

import pytest

from server.auth.stage import AuthenticateStage
from server.call import RunInfo
from server.errors import BackendUnavailable, Denied
from server.metering.stage import AdmitStage, ChargeStage, call_key
from server.metering.tokens import TokenCounter
from server.policy.engine import Decision
from server.policy.stage import PolicyStage
from server.registry import ToolOutput
from server.settings import Limits, MeterSettings
from tests.fakes.backends import MemoryMeter, StaticPolicy, make_call, make_identity

pytestmark = pytest.mark.anyio


async def test_authenticate_denies_a_call_without_identity() -> None:
    with pytest.raises(Denied, match="no authenticated identity"):
        await AuthenticateStage().run(make_call(identity=None))


async def test_authenticate_denies_missing_required_scopes() -> None:
    stage = AuthenticateStage(["mcp:tools"])
    with pytest.raises(Denied, match="token lacks scope 'mcp:tools'"):
        await stage.run(make_call())
    await stage.run(make_call(identity=make_identity(scopes=("mcp:tools",))))


COUNTER = TokenCounter()


def meter_settings(**overrides: object) -> MeterSettings:
    return MeterSettings(**overrides)  # type: ignore[arg-type]


async def test_admit_reserves_the_arguments_and_the_output_allowance() -> None:
    settings = meter_settings(limits=Limits(tokens_per_day=5000), reserve_output_tokens=100)
    call = await AdmitStage(MemoryMeter(), settings, COUNTER).run(make_call(arguments={"q": "hello world"}))
    assert call.budget is not None
    assert call.tokens_in == COUNTER.count({"q": "hello world"})
    assert (call.budget.tokens_limit, call.budget.reserved_tokens) == (5000, call.tokens_in + 100)


async def test_limits_come_from_the_agent_then_its_groups_then_defaults() -> None:
    from server.metering.limits import resolve_limits
    from server.settings import LimitOverrides

    settings = meter_settings(
        limits=Limits(tokens_per_day=100, calls_per_minute=10),
        groups={"analysts": LimitOverrides(tokens_per_day=1000), "vip": LimitOverrides(tokens_per_day=0)},
        agents={"bot-7": LimitOverrides(calls_per_minute=3)},
    )
    assert resolve_limits(settings, make_identity(groups=("analysts",))).tokens_per_day == 1000
    assert resolve_limits(settings, make_identity(groups=("analysts", "vip"))).tokens_per_day == 0  # unlimited wins
    bot = resolve_limits(settings, make_identity(agent_id="bot-7", groups=("analysts",)))
    assert (bot.calls_per_minute, bot.tokens_per_day) == (3, 1000)
    assert resolve_limits(settings, make_identity(groups=())).tokens_per_day == 100


async def test_admit_fails_closed_when_the_meter_is_down() -> None:
    with pytest.raises(BackendUnavailable, match="meter store unavailable"):
        await AdmitStage(MemoryMeter(down=True), meter_settings(), COUNTER).run(make_call())


async def test_charge_settles_what_was_used() -> None:
    meter = MemoryMeter()
    settings = meter_settings(reserve_output_tokens=1000)
    call = await AdmitStage(meter, settings, COUNTER).run(make_call(arguments={"q": "x" * 40}))
    call = await ChargeStage(meter, COUNTER).run(replace(call, output=ToolOutput(text="some words " * 8)))
    assert call.tokens_out == COUNTER.count("some words " * 8)
    assert meter.tokens["agent-1"] == call.tokens_in + call.tokens_out
    assert meter.reserved == {}


async def test_a_result_beyond_its_reservation_is_truncated_to_fit() -> None:
    meter = MemoryMeter()
    call = await AdmitStage(meter, meter_settings(reserve_output_tokens=30), COUNTER).run(make_call())
    big = ToolOutput(text="lorem ipsum dolor sit amet " * 100, structured={"x": 1})
    call = await ChargeStage(meter, COUNTER).run(replace(call, output=big))
    assert call.output is not None
    assert call.output.text.endswith("[truncated: the result exceeded the 30 tokens reserved for it]")
    assert call.output.structured is None
    assert call.tokens_in + call.tokens_out <= call.budget.reserved_tokens  # type: ignore[union-attr]


async def test_a_stopped_call_releases_its_reservation() -> None:
    from server.metering.stage import ReleaseReservation

    meter = MemoryMeter()
    call = await AdmitStage(meter, meter_settings(), COUNTER).run(make_call())
    assert meter.reserved
    await ReleaseReservation(meter)(call)
    assert meter.reserved == {}


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
