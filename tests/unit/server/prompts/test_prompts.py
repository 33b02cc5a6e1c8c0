"""Prompts and completions as pipeline targets: what they need, what policy sees, what they return."""

from __future__ import annotations

from typing import Any

import pytest

from server.completions import CompletionTarget
from server.prompts.catalog import PromptCatalog
from server.prompts.target import ROLE, PromptDefinition, PromptTarget
from server.tool_schema import compile_arguments

pytestmark = pytest.mark.anyio

DEFINITION = PromptDefinition(
    name="summarise",
    description="Summarise a topic.",
    arguments=({"name": "topic", "required": True}, {"name": "tone"}),
)


async def _get(name: str, arguments: dict[str, str]) -> dict[str, Any]:
    text = f"{name}: {arguments['topic']}"
    return {"messages": [{"role": "assistant", "content": {"type": "text", "text": text}}]}


async def _complete(argument: str, value: str, context: dict[str, str]) -> dict[str, Any]:
    return {"values": [f"{value}{i}" for i in range(150)], "hasMore": True}


def prompt(name: str = "files.summarise") -> PromptTarget:
    return PromptTarget(
        DEFINITION, name=name, securable="main.upstream.files__prompt__summarise", getter=_get, upstream="files"
    )


def test_a_prompt_takes_its_declared_string_arguments_and_needs_the_required_ones() -> None:
    validator = compile_arguments(prompt().spec.input_schema)
    assert validator.first_error({"topic": "rust"}) is None
    assert validator.first_error({"tone": "dry"}) is not None  # topic is required
    assert validator.first_error({"topic": "rust", "extra": "x"}) is not None  # no others
    assert validator.first_error({"topic": 3}) is not None  # strings only


def test_getting_a_prompt_needs_execute_on_its_function() -> None:
    assert [str(r) for r in prompt().requirements()][-1] == "EXECUTE on main.upstream.files__prompt__summarise"


async def test_messages_keep_their_roles_through_the_pipeline() -> None:
    output = await prompt().invoke({"topic": "rust"})
    assert output.content == ({"type": "text", "text": "summarise: rust", ROLE: "assistant"},)


def test_policy_sees_the_prompt_and_its_declared_arguments() -> None:
    seen = prompt().decision_input({"topic": "rust"})
    assert seen == {
        "prompt": {
            "name": "summarise",
            "upstream": "files",
            "arguments": [{"name": "topic", "required": True}, {"name": "tone", "required": False}],
        }
    }


def test_a_prompt_name_another_upstream_serves_is_refused() -> None:
    catalog = PromptCatalog()
    catalog.sync("files", [prompt()])
    assert catalog.collision("docs", prompt()) is not None
    assert catalog.get("files.summarise") is not None


async def test_a_completion_is_decided_on_its_prompt_with_the_typed_text_as_an_argument() -> None:
    target = prompt()
    target.completer = _complete
    completion = CompletionTarget(target, {"type": "ref/prompt", "name": "files.summarise"}, "topic")
    assert completion.requirements() == target.requirements()
    seen = completion.decision_input({"tone": "dry", "topic": "ru"})
    assert seen["completion"] == {
        "ref": {"type": "ref/prompt", "name": "files.summarise"},
        "argument": {"name": "topic", "value": "ru"},
        "context": {"tone": "dry"},
    }
    assert seen["prompt"]["name"] == "summarise"
    output = await completion.invoke({"topic": "ru"})
    assert output.structured is not None
    assert len(output.structured["completion"]["values"]) == 100  # MCP caps a completion at 100 values


async def test_a_source_that_completes_nothing_gives_no_values() -> None:
    completion = CompletionTarget(prompt(), {"type": "ref/prompt", "name": "files.summarise"}, "topic")
    output = await completion.invoke({"topic": "ru"})
    assert output.structured == {"completion": {"values": []}}


def test_a_prompt_collides_by_name_in_any_case_and_by_securable_within_its_own_listing() -> None:
    catalog = PromptCatalog()
    catalog.sync("files", [prompt()])
    clash = catalog.collision("docs", prompt("FILES.Summarise"))
    assert clash == "prompt 'FILES.Summarise' of docs collides with files's; theirs keeps serving"
    assert catalog.collision("files", prompt()) is None  # its own, listed again
    twin = catalog.collision("files", prompt("files.other"), [prompt()])  # the same securable in one listing
    assert twin == "prompt 'files.other' of files has the securable of 'files.summarise'"


def test_a_prompt_catalog_tells_its_listeners_of_a_change_only() -> None:
    catalog = PromptCatalog()
    heard: list[int] = []
    catalog.on_change(lambda: heard.append(1))
    catalog.sync("files", [prompt()])
    catalog.sync("files", [prompt()])
    catalog.sync("files", [])
    assert len(heard) == 2
    assert len(catalog) == 0
