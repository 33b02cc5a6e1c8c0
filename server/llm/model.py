"""The model behind an LLM call as a securable: what grants and policy see instead of a tool."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.errors import ConfigError
from server.grants.local import LocalCatalog
from server.registry import ToolOutput, ToolSpec
from server.settings import LlmSettings

TOOL_NAME = "llm:chat.completions"
_SECURABLE = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_\-]")


def model_securable(settings: LlmSettings, model: str) -> str:
    """The catalog name of `model`: configured in `llm.models`, else `<models_schema>.<model>` with
    every character a securable name cannot hold replaced by `_`."""
    configured = settings.models.get(model)
    if configured is not None and configured.securable:
        return configured.securable
    return f"{settings.models_schema}.{_NOT_IN_NAME.sub('_', model)[:128]}"


@dataclass(frozen=True, slots=True)
class ModelSpec(ToolSpec):
    """A `ToolSpec` for a model: its name is the route's (`llm:chat.completions`, not held to MCP's
    tool-name grammar), its securable the model's."""

    def __post_init__(self) -> None:
        if not _SECURABLE.match(self.securable):
            raise ConfigError(f"model securable {self.securable!r} is not catalog.schema.name")


@dataclass(frozen=True, slots=True)
class ModelTool:
    """The model as the pipeline's `tool`; the LLM route forwards the request itself, never `invoke`."""

    spec: ToolSpec
    model: str = ""

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        raise RuntimeError("the LLM route forwards requests itself")


def model_tool(settings: LlmSettings, model: str) -> ModelTool:
    spec = ModelSpec(
        name=TOOL_NAME,
        description=f"chat completions of {model}",
        securable=model_securable(settings, model),
        input_schema={"type": "object"},
    )
    return ModelTool(spec=spec, model=model)


def model_securables(settings: LlmSettings) -> list[str]:
    """The securables of the configured models, for the local catalog to hold."""
    return [model_securable(settings, name) for name in settings.models]


def register_models(catalog: LocalCatalog, settings: LlmSettings, demo: bool) -> None:
    """Put the models schema and every configured model in the local catalog, so they can be granted
    (`GRANT EXECUTE ON FUNCTION main.llm.<model>`, or on the schema for all of them). In demo mode
    the analysts group may use them, as it may use the demo tools."""
    catalog.add_securable("SCHEMA", settings.models_schema, owner="admins" if demo else None)
    for securable in model_securables(settings):
        catalog.add_securable("FUNCTION", securable)
    if demo:
        schema = settings.models_schema
        catalog.grant_many(
            [
                ("analysts", "USE CATALOG", schema.split(".")[0]),
                ("analysts", "USE SCHEMA", schema),
                ("analysts", "EXECUTE", schema),
            ]
        )
