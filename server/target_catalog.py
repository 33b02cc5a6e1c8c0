"""A catalog of governed targets other than tools (resources, prompts): what each source serves, kept in
step by `sync`, with the collisions between sources refused and the listeners told of each change."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from server.target import Target

T = TypeVar("T", bound=Target)


class TargetCatalog(Generic[T]):
    """Targets by source (an upstream's name, or `castellan` for the gateway's own). `collision` says
    why a target cannot be served beside what other sources serve, and beside the `also` its own
    source lists with it (the first keeps serving); `sync` replaces what a source serves and tells
    each `on_change` listener when what is served changed (the list-changed notifications).

    A kind says what a clash is (`_clashes`) and what a change is (`_shape`)."""

    def __init__(self) -> None:
        self._by_source: dict[str, list[T]] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def collision(self, source: str, target: T, also: Iterable[T] = ()) -> str | None:
        for other_source, targets in self._by_source.items():
            if other_source == source:
                continue
            for other in targets:
                clash = self._clashes(target, source, other, other_source)
                if clash:
                    return clash
        for other in also:
            clash = self._clashes(target, source, other, None)
            if clash:
                return clash
        return None

    def _clashes(self, target: T, source: str, other: T, other_source: str | None) -> str | None:
        """Why `target` of `source` cannot be served beside `other` (of `other_source`; None: of the same
        source, listed with it), or None."""
        raise NotImplementedError

    def _shape(self, target: T) -> Hashable:
        """What agents are shown of `target`: a change in it is a list change."""
        raise NotImplementedError

    def sync(self, source: str, targets: Iterable[T]) -> None:
        new = list(targets)
        old = self._by_source.get(source, [])
        self._by_source[source] = new
        if [self._shape(t) for t in old] != [self._shape(t) for t in new]:
            for listener in self._listeners:
                listener()

    def __iter__(self) -> Iterator[T]:
        return iter([t for targets in list(self._by_source.values()) for t in targets])

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_source.values())
