"""The prompt catalog: every prompt the gateway serves, by the name it serves it under."""

from __future__ import annotations

from server.prompts.target import PromptTarget
from server.target_catalog import TargetCatalog


class PromptCatalog(TargetCatalog[PromptTarget]):
    """Prompts from each upstream. A name (or securable) another source already serves, or that one
    listed beside it has, is refused by `collision` (the first keeps serving)."""

    def _clashes(self, target: PromptTarget, source: str, other: PromptTarget, other_source: str | None) -> str | None:
        if other.served_name.casefold() == target.served_name.casefold():
            owner = other_source if other_source is not None else source
            return f"prompt {target.served_name!r} of {source} collides with {owner}'s; theirs keeps serving"
        if other.spec.securable.casefold() == target.spec.securable.casefold():
            return f"prompt {target.spec.name!r} of {source} has the securable of {other.spec.name!r}"
        return None

    def _shape(self, target: PromptTarget) -> tuple[object, ...]:
        return (target.spec.name, target.definition.description, target.definition.arguments, target.blocked)

    def get(self, name: str) -> PromptTarget | None:
        return next((t for t in self if t.served_name == name), None)
