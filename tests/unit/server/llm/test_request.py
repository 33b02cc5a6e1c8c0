"""Chat requests bounded before they leave: every limit field capped, n x cap reserved."""

from __future__ import annotations

import pytest

from server.llm.request import BadRequest, parse_chat
from server.settings import LlmModel, LlmSettings

SETTINGS = LlmSettings(max_completion_tokens=2000, models={"small": LlmModel(max_completion_tokens=500)})
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**extra: object) -> dict[str, object]:
    return {"model": "big", "messages": MESSAGES, **extra}


def test_both_limit_fields_get_the_smaller_so_either_one_bounds_the_provider() -> None:
    request = parse_chat(chat(max_tokens=1500, max_completion_tokens=100), SETTINGS, 4096)
    assert (request.body["max_tokens"], request.body["max_completion_tokens"], request.cap) == (100, 100, 100)


def test_every_choice_is_reserved_in_full() -> None:
    request = parse_chat(chat(n=8, max_tokens=150), SETTINGS, 4096)
    assert request.max_output_tokens == 1200


def test_the_route_cap_and_the_model_limit_lower_what_is_asked() -> None:
    assert parse_chat(chat(max_tokens=10**6), SETTINGS, 4096).body["max_tokens"] == 2000
    only_new = parse_chat(chat(model="small", max_completion_tokens=900), SETTINGS, 4096)
    assert only_new.body["max_completion_tokens"] == 500
    assert "max_tokens" not in only_new.body  # the client's field is kept (o-series models reject max_tokens)


def test_without_a_limit_the_gateway_sets_one() -> None:
    request = parse_chat(chat(), SETTINGS, 1000)
    assert (request.body["max_tokens"], request.max_output_tokens) == (1000, 1000)
    assert parse_chat(chat(model="small"), SETTINGS, 1000).body["max_tokens"] == 500


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 0},
        {"n": 17},
        {"n": True},
        {"max_tokens": "100"},
        {"max_tokens": 0},
        {"max_completion_tokens": 1.5},
        {"stream": "yes"},
        {"model": ""},
        {"messages": "hi"},
    ],
)
def test_malformed_requests_are_refused_not_guessed(bad: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        parse_chat({**chat(), **bad}, SETTINGS.model_copy(update={"max_choices": 16}), 4096)
