from __future__ import annotations

import dataclasses

import pytest

from server.call import Budget
from tests.fakes.backends import make_call


def test_evolve_makes_the_copy_dataclasses_replace_makes() -> None:
    call = make_call()
    changes = {"recorded": True, "tokens_in": 12, "budget": Budget(tokens_used=3)}
    evolved = call.evolve(**changes)
    assert evolved == dataclasses.replace(call, **changes)
    assert evolved is not call
    assert call.recorded is False  # the original is untouched


def test_evolve_refuses_a_name_that_is_not_a_field() -> None:
    with pytest.raises(TypeError, match="no field"):
        make_call().evolve(recordedd=True)


def test_timed_appends_the_stage_timing() -> None:
    call = make_call().timed("a", 0.5).timed("b", 0.25)
    assert call.timings == (("a", 0.5), ("b", 0.25))


def test_an_evolved_call_shares_nothing_mutable_with_the_original() -> None:
    call = make_call()
    evolved = call.evolve(tokens_out=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolved.tokens_out = 6  # type: ignore[misc]
    assert (call.tokens_out, evolved.tokens_out) == (0, 5)
    assert evolved.evolve(tokens_out=0) == call
