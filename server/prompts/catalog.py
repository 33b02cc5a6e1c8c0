"""The prompt catalog: every prompt the gateway serves, by the name it serves it under."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from server.prompts.target import PromptTarget


class PromptCatalog:
    """Prompts from each upstream, kept in step by `sync`. A name another source already serves is
    refused by `collision` (the first keeps serving). `on_change` listeners hear of each `sync` that
    changed what is served."""

    def __init__(self) -> None:
        self._by_source: dict[str, list[PromptTarget]] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def collision(self, source: str, target: PromptTarget, also: Iterable[PromptTarget] = ()) -> str | None:
        others = [(s, t) for s, ts in self._by_source.items() if s != source for t in ts]
        for other_source, other in [*others, *((source, t) for t in also)]:
            if other.served_name.casefold() == target.served_name.casefold():
                name = target.served_name
                return f"prompt {name!r} of {source} collides with {other_source}'s; theirs keeps serving"
            if other.spec.securable.casefold() == target.spec.securable.casefold():
                return f"prompt {target.spec.name!r} of {source} has the securable of {other.spec.name!r}"
        return None

    def sync(self, source: str, targets: Iterable[PromptTarget]) -> None:
        new = list(targets)
        old = self._by_source.get(source, [])
        self._by_source[source] = new
        if _shape(old) != _shape(new):
            for listener in self._listeners:
                listener()

    def get(self, name: str) -> PromptTarget | None:
        return next((t for t in self if t.served_name == name), None)

    def __iter__(self) -> Iterator[PromptTarget]:
        return iter([t for targets in list(self._by_source.values()) for t in targets])

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_source.values())


def _shape(targets: list[PromptTarget]) -> list[tuple[object, ...]]:
    return [(t.spec.name, t.definition.description, t.definition.arguments, t.blocked) for t in targets]
