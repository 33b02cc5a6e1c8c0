"""The default "drop table" rule holds however the words are written (spacing, invisible or full-width
characters, case), on both engines: the gateway's normalised view of the arguments in the input."""

from __future__ import annotations

import random
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from server.policy._input import build_input, input_problem, normalized_text
from server.policy.bundle import PolicyBundle
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import PolicyEngine
from server.policy.opa import OpaServerEngine
from server.settings import REPO_ROOT
from tests.fakes.backends import make_call
from tests.opa import run_opa
from tools.echo import EchoTool

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

_rng = random.Random()
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]


def _between_letters(word: str, pick: Callable[[], str]) -> str:
    return "".join(c + (pick() if c != " " and _rng.random() < 0.7 else "") for c in word).rstrip()


def spaced(word: str) -> str:
    return word.replace(" ", " " * _rng.randint(2, 6))


def tabs_and_newlines(word: str) -> str:
    return word.replace(" ", "".join(_rng.choice(" \t\n\r\u00a0\u3000") for _ in range(_rng.randint(1, 4))))


def zero_width(word: str) -> str:
    return _between_letters(word, lambda: _rng.choice(ZERO_WIDTH))


def full_width(word: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isalpha() and _rng.random() < 0.8 else c for c in word)


def mixed_case(word: str) -> str:
    return "".join(c.upper() if _rng.random() < 0.5 else c for c in word)


def soft_hyphens(word: str) -> str:
    return _between_letters(word, lambda: "\u00ad")


def everything(word: str) -> str:
    return spaced(soft_hyphens(zero_width(mixed_case(full_width(tabs_and_newlines(word))))))


DISGUISES = [spaced, tabs_and_newlines, zero_width, full_width, mixed_case, soft_hyphens, everything]


@pytest.fixture(params=["embedded", "opa"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PolicyEngine]:
    shutil.copytree(REPO_ROOT / "policies", tmp_path / "policies")
    bundle = PolicyBundle.from_directory(tmp_path / "policies")
    if request.param == "embedded":
        embedded = EmbeddedEngine(bundle)
        yield embedded
        await embedded.close()
        return
    with run_opa() as opa:
        server = OpaServerEngine(opa.url, bundle=bundle)
        yield server
        await server.close()


def echo_input(text: object) -> dict[str, object]:
    document = build_input(make_call(tool=EchoTool(), tool_name="echo", arguments={"text": text}))
    assert input_problem(document) is None
    return document


@pytest.mark.parametrize("disguise", DISGUISES, ids=lambda d: d.__name__)
async def test_a_disguised_drop_table_is_denied(engine: PolicyEngine, disguise: Callable[[str], str]) -> None:
    for _ in range(5):
        hidden = disguise("drop table")
        decision = await engine.decide(echo_input(f"please {hidden} users"))
        assert not decision.allow, repr(hidden)
        assert decision.reasons == ('argument text contains blocked text "drop table"',), repr(hidden)


async def test_harmless_text_is_still_allowed(engine: PolicyEngine) -> None:
    for text in ["a table for two", "drop by the tablé", "\uff28\uff25\uff2c\uff2c\uff2f\u200b world", "tab\tle"]:
        decision = await engine.decide(echo_input(text))
        assert decision.allow, text


def test_the_view_is_nfkc_case_folded_and_without_invisible_characters() -> None:
    assert normalized_text("\uff24\uff32\uff2f\uff30\u200d\t\n TA\u00adBLE\u202e ") == "drop table"
    assert normalized_text("Straße") == "strasse"
    document = echo_input("A\u200bB")
    assert document["normalized"] == {"arguments": {"text": "ab"}, "strings": [["text", "ab"]]}
    assert document["arguments"] == {"text": "A\u200bB"}  # the arguments themselves are unchanged
    nested = build_input(make_call(tool=EchoTool(), arguments={"n": 1.0, "x": [{"Key": "\uff39"}]}))["normalized"]
    assert nested["arguments"] == {"n": 1, "x": [{"Key": "y"}]}  # keys and structure unchanged
    assert nested["strings"] == [["x", "key"], ["x", "y"]]  # every string at any depth, keys too


async def test_a_disguised_drop_table_nested_anywhere_is_denied(engine: PolicyEngine) -> None:
    hidden = everything("drop table")
    arguments = {"text": "hi", "batch": [{"sql": f"select 1; {hidden} x"}], "opts": {hidden: True}}
    document = build_input(make_call(tool=EchoTool(), tool_name="echo", arguments=arguments))
    assert input_problem(document) is None
    decision = await engine.decide(document)
    assert not decision.allow, repr(hidden)
    assert set(decision.reasons) == {
        'argument batch contains blocked text "drop table"',
        'argument opts contains blocked text "drop table"',
    }
