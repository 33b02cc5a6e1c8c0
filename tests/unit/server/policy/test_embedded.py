from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from server.errors import ConfigError
from server.in_flight import WORKING
from server.policy import inprocess_opa
from server.policy._input import build_input
from server.policy._result import EVALUATION_FAILED
from server.policy._thread_engines import _engines
from server.policy.bundle import PolicyBundle
from server.policy.embedded import EmbeddedEngine, input_json
from server.settings import REPO_ROOT
from tests.fakes.backends import make_call, make_identity
from tools.echo import EchoTool
from tools.profile import ProfileTool
from tools.reset import ResetTool

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["opa-library", "regorus"])
def engine(request: pytest.FixtureRequest) -> EmbeddedEngine:
    """Both evaluators of the embedded engine decide the default policy."""
    if request.param == "opa-library" and not inprocess_opa.available():
        pytest.skip("the OPA library is not built (scripts/build-opa-library needs Go)")
    return EmbeddedEngine(PolicyBundle.from_directory(REPO_ROOT / "policies"), evaluator=request.param)


def doc(**overrides: Any) -> dict[str, Any]:
    call = make_call(tool=EchoTool(), tool_name="echo", arguments={"text": "hi"})
    for key, value in overrides.items():
        call = call.__class__(**{**{f: getattr(call, f) for f in call.__dataclass_fields__}, key: value})
    return build_input(call)


def write_policy(tmp_path: Path, rego: str, data: str | None = None) -> PolicyBundle:
    (tmp_path / "p.rego").write_text(rego)
    if data is not None:
        (tmp_path / "data.json").write_text(data)
    return PolicyBundle.from_directory(tmp_path)


async def test_default_policy_allows_an_analyst_to_echo(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc())
    assert decision.allow
    assert decision.reasons == ()
    assert decision.engine == "embedded"
    assert decision.policy_version == engine.policy_version != ""


async def test_default_policy_denies_text_over_the_configured_length(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc(arguments={"text": "x" * 201}))
    assert not decision.allow
    assert decision.reasons == ("argument text must be a string of at most 200 characters",)


async def test_a_wrongly_typed_argument_is_denied_not_coerced(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc(arguments={"text": 12345}))
    assert decision.reasons == ("argument text must be a string of at most 200 characters",)


async def test_list_decisions_ignore_argument_rules(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc(arguments={}, action="list"))
    assert decision.allow


async def test_destructive_tools_are_for_admins_only(engine: EmbeddedEngine) -> None:
    analyst = await engine.decide(doc(tool=ResetTool(), tool_name="demo.reset", arguments={}))
    admin = await engine.decide(
        doc(tool=ResetTool(), tool_name="demo.reset", arguments={}, identity=make_identity(groups=("admins",)))
    )
    assert not analyst.allow
    assert "tool demo.reset is destructive: only groups admins may call it" in analyst.reasons
    assert admin.allow


async def test_blocked_text_is_denied_case_insensitively(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc(arguments={"text": "please DROP TABLE users"}))
    assert decision.reasons == ('argument text contains blocked text "drop table"',)


async def test_obligations_come_from_the_tool_data(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc(tool=ProfileTool(), tool_name="demo.profile", arguments={"customer_id": "c-1"}))
    assert decision.allow
    assert decision.obligations == {"redact_fields": ["email"], "max_result_chars": 2000}


async def test_all_reasons_are_given_sorted(engine: EmbeddedEngine) -> None:
    decision = await engine.decide(doc(arguments={"text": "drop table " + "x" * 300}))
    assert decision.reasons == tuple(sorted(decision.reasons))
    assert len(decision.reasons) == 2


async def test_an_input_that_breaks_the_schema_is_denied(engine: EmbeddedEngine) -> None:
    bad = doc()
    bad["identity"]["groups"] = "admins"  # a string where a list belongs
    decision = await engine.decide(bad)
    assert not decision.allow
    assert decision.reasons == ("decision input invalid: identity/groups: 'admins' is not of type 'array'",)


async def test_an_undefined_decision_is_a_deny(tmp_path: Path) -> None:
    bundle = write_policy(tmp_path, "package castellan.gateway\n\nimport rego.v1\n\ndecision := {} if false\n")
    decision = await EmbeddedEngine(bundle).decide(doc())
    assert decision.reasons == ("policy returned no decision (undefined)",)


async def test_an_unknown_obligation_is_a_deny(tmp_path: Path) -> None:
    rego = 'package castellan.gateway\n\nimport rego.v1\n\ndecision := {"allow": true, "obligations": {"notify": 1}}\n'
    decision = await EmbeddedEngine(write_policy(tmp_path, rego)).decide(doc())
    assert not decision.allow
    assert decision.reasons == ("policy asked for obligation 'notify', which this gateway cannot carry out",)


async def test_a_non_boolean_allow_is_a_deny(tmp_path: Path) -> None:
    rego = 'package castellan.gateway\n\nimport rego.v1\n\ndecision := {"allow": "yes"}\n'
    decision = await EmbeddedEngine(write_policy(tmp_path, rego)).decide(doc())
    assert decision.reasons == ("policy decision has no boolean 'allow'",)


async def test_an_evaluation_error_is_a_deny_with_the_reason(tmp_path: Path) -> None:
    rego = (
        "package castellan.gateway\n\nimport rego.v1\n\n"
        'decision := {"allow": true} if input.action == "call"\n'
        'decision := {"allow": false} if input.tool.name == "echo"\n'
    )
    decision = await EmbeddedEngine(write_policy(tmp_path, rego)).decide(doc())
    assert not decision.allow
    assert decision.reasons == ("policy evaluation failed",)


def test_a_policy_that_does_not_compile_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy p.rego does not compile"):
        EmbeddedEngine(write_policy(tmp_path, "package x\n\nallow if {"))


def test_data_files_land_under_their_directory_as_in_opa(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "data.json").write_text('{"k": 1}')
    bundle = write_policy(tmp_path, "package x\n")
    assert bundle.data == {"a": {"b": {"k": 1}}}


def test_the_policy_version_changes_with_the_policy(tmp_path: Path) -> None:
    first = write_policy(tmp_path, "package x\n").version
    second = write_policy(tmp_path, "package x\n\ny := 1\n").version
    assert first != second


async def test_a_slow_policy_moves_to_the_worker_threads_and_decides_the_same(tmp_path: Path) -> None:
    rego = (
        "package castellan.gateway\n\nimport rego.v1\n\n"
        "n := count([x | some x in numbers.range(1, 100000)])\n\n"
        'decision := {"allow": n > 0, "reasons": set()}\n'
    )
    # a generous decision timeout: on a loaded machine this slow policy must still decide, not time out
    engine = EmbeddedEngine(write_policy(tmp_path, rego), inline_max_us=250, timeout_seconds=60.0)
    first = await engine.decide(doc())  # inline: slow, so the average rises over the limit
    assert engine._average > 250e-6
    second = await engine.decide(doc())  # on a worker thread now
    assert (first.allow, second.allow) == (True, True)
    await engine.close()


async def test_inline_max_zero_always_uses_the_threads(engine: EmbeddedEngine) -> None:
    threaded = EmbeddedEngine(PolicyBundle.from_directory(REPO_ROOT / "policies"), inline_max_us=0)
    assert (await threaded.decide(doc())).allow
    assert not any(owner == threaded._owner for owner, _ in _engines())  # no inline engine was made
    await threaded.close()


@pytest.mark.parametrize("evaluator", ["opa-library", "regorus"])
async def test_with_another_call_worked_on_an_opa_library_decision_goes_to_a_thread(
    evaluator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPA's library evaluates without the GIL: with the loop busy on another call, its decision runs on
    a worker thread (the loop serves the other call meanwhile); regorus holds the GIL, so it stays inline."""
    if evaluator == "opa-library" and not inprocess_opa.available():
        pytest.skip("the OPA library is not built (scripts/build-opa-library needs Go)")
    engine = EmbeddedEngine(PolicyBundle.from_directory(REPO_ROOT / "policies"), evaluator=evaluator)
    monkeypatch.setattr(WORKING, "calls", 2)  # this call and another
    busy = await engine.decide(doc())
    threaded = not any(owner == engine._owner for owner, _ in _engines())  # no inline engine was made
    monkeypatch.setattr(WORKING, "calls", 1)  # this call alone
    alone = await engine.decide(doc())
    assert (busy.allow, alone.allow) == (True, True)
    assert threaded is (evaluator == "opa-library")
    assert any(owner == engine._owner for owner, _ in _engines())  # alone: decided inline
    await engine.close()


async def test_an_engine_collected_on_another_thread_frees_no_regorus_engine_there() -> None:
    import gc
    import threading

    engine = EmbeddedEngine(PolicyBundle.from_directory(REPO_ROOT / "policies"))
    assert (await engine.decide(doc())).allow  # decided inline: a regorus engine on this thread
    owner = engine._owner
    del engine
    collector = threading.Thread(target=gc.collect)
    collector.start()
    collector.join()  # an unraisable "dropped on another thread" would fail this test
    assert any(key[0] == owner for key in _engines())  # still held here, by the thread that made it


def test_a_broken_bundle_refused_on_a_worker_thread_leaves_no_engine_to_other_threads(tmp_path: Path) -> None:
    """Refusing a broken module must free its engine on the refusing thread: a traceback kept alive
    would otherwise hand the engine to whichever thread runs garbage collection (regorus aborts)."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from server.errors import ConfigError
    from server.policy.bundle import PolicyBundle
    from server.policy.embedded import compile_policy

    (tmp_path / "broken.rego").write_text("package broken\n\nallow if {\n")
    bundle = PolicyBundle.from_directory(tmp_path)
    errors: list[BaseException] = []

    def refuse() -> None:
        try:
            compile_policy(bundle, "data.broken.allow", "regorus")
        except ConfigError as exc:
            errors.append(exc)  # kept, with its traceback, beyond the worker thread

    with ThreadPoolExecutor(1) as pool:
        pool.submit(refuse).result()
    assert "does not compile" in str(errors[0])
    errors.clear()
    gc.collect()  # here, on the main thread: no engine may be left in the collected frames


HOSTILE_COUNT = (
    "package castellan.gateway\n\nimport rego.v1\n\n"
    'decision := {"allow": strings.count(input.arguments.text, input.arguments.text) >= 0, "reasons": set()}\n'
)


@pytest.mark.parametrize("inline_max_us", [250.0, 0.0])
async def test_a_regorus_panic_is_a_denial_and_the_engine_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline_max_us: float
) -> None:
    """strings.count(s, "") panics inside regorus (pyo3's PanicException is a BaseException). Outside
    the verified subset, so refused at load; let it through here to prove the panic is contained."""
    from server.policy import regorus_subset

    anything = regorus_subset.Subset(ascii_only=False, integers_only=False)
    monkeypatch.setattr(regorus_subset, "check_subset", lambda engine: anything)
    engine = EmbeddedEngine(write_policy(tmp_path, HOSTILE_COUNT), evaluator="regorus", inline_max_us=inline_max_us)
    for _ in range(3):
        hostile = await engine.decide(doc(arguments={"text": ""}))
        assert (hostile.allow, hostile.reasons) == (False, ("policy evaluation failed",))
        for _ in range(40):  # a poisoned engine denied about 1 call in 32 afterwards
            assert (await engine.decide(doc(arguments={"text": "ab"}))).allow
    await engine.check()
    await engine.close()


def test_regorus_refuses_a_builtin_outside_the_verified_subset_naming_it(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"policy uses builtin strings.count \(p.rego:5\): outside what the embedded engine can decide",
    ):
        EmbeddedEngine(write_policy(tmp_path, HOSTILE_COUNT), evaluator="regorus")


def test_the_opa_library_refuses_network_builtins_naming_them(tmp_path: Path) -> None:
    rego = 'package castellan.gateway\n\nimport rego.v1\n\ndecision := http.send({"method": "get", "url": "x"})\n'
    with pytest.raises(ConfigError, match=r"p.rego:5 uses builtin http.send, which the embedded engine refuses"):
        EmbeddedEngine(write_policy(tmp_path, rego), evaluator="opa-library")


async def test_the_opa_library_decides_concurrently_on_worker_threads() -> None:
    """ctypes releases the GIL: several threads evaluate in Go at once, each answer its own."""
    if not inprocess_opa.available():
        pytest.skip("the OPA library is not built (scripts/build-opa-library needs Go)")
    import asyncio

    engine = EmbeddedEngine(
        PolicyBundle.from_directory(REPO_ROOT / "policies"), workers=4, inline_max_us=0, evaluator="opa-library"
    )
    texts = [("x" * (i % 300)) for i in range(400)]
    decisions = await asyncio.gather(*(engine.decide(doc(arguments={"text": t})) for t in texts))
    assert [d.allow for d in decisions] == [len(t) <= 200 for t in texts]
    await engine.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_a_non_finite_float_in_the_arguments_is_still_denied(engine: EmbeddedEngine, bad: float) -> None:
    # orjson would write it as null (a valid input); the engine must hand the evaluator what json.dumps
    # writes (NaN/Infinity), which it refuses: a deny, fail closed
    assert (await engine.decide(doc(arguments={"text": "hi", "n": [{"x": 1.0}]}))).allow
    decision = await engine.decide(doc(arguments={"text": "hi", "n": [{"x": bad}]}))
    assert not decision.allow
    assert decision.reasons == (EVALUATION_FAILED,)


def test_input_json_reads_as_json_dumps() -> None:
    document = build_input(make_call(tool=EchoTool(), tool_name="echo", arguments={"text": "hi", "f": 1.5}))
    assert json.loads(input_json(document)) == json.loads(json.dumps(document))
    assert input_json({"a": (1, [float("nan")])}) == json.dumps({"a": (1, [float("nan")])})
    assert input_json({"a": 10**20}) == json.dumps({"a": 10**20})  # beyond orjson's 64 bits
    assert input_json({1: "x"}) == json.dumps({1: "x"})  # a key orjson refuses
    assert input_json(document) == orjson.dumps(document).decode()  # a real input takes the fast path
    # orjson writes these; json.dumps refuses them, and the engine must go on refusing them as before
    for value in (datetime.now(UTC), uuid.uuid4(), EchoTool().spec):
        with pytest.raises(TypeError):
            input_json({"arguments": {"v": value}})
