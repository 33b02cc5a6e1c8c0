"""The resource catalog: every resource and template the gateway serves, by source, found by URI."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from server.resources.target import ResourceTarget


class ResourceCatalog:
    """Resources and templates from each source (an upstream's name, or `castellan` for the gateway's
    own), kept in step by `sync`. A URI is served by one source only: a resource whose URI (or
    template) another source already serves is refused by `collision` and the first keeps serving.
    `find` prefers a resource's exact URI to a template that matches it; among templates, the first
    registered. `on_change` is told after each `sync` that changed what is served (list-changed)."""

    def __init__(self) -> None:
        self._by_source: dict[str, list[ResourceTarget]] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def collision(self, source: str, target: ResourceTarget, also: Iterable[ResourceTarget] = ()) -> str | None:
        kind = "template" if target.definition.template else "resource"
        for other_source, targets in self._by_source.items():
            if other_source == source:
                continue
            for other in targets:
                if other.definition.uri == target.definition.uri or other.spec.securable == target.spec.securable:
                    uri = target.definition.uri
                    return f"{kind} {uri!r} of {source} collides with {other_source}'s; theirs keeps serving"
        for other in also:
            if other.spec.securable.casefold() == target.spec.securable.casefold():
                return f"{kind} {target.definition.uri!r} of {source} has the securable of {other.definition.uri!r}"
        return None

    def sync(self, source: str, targets: Iterable[ResourceTarget]) -> None:
        new = list(targets)
        old = self._by_source.get(source, [])
        self._by_source[source] = new
        if _shape(old) != _shape(new):
            for listener in self._listeners:
                listener()

    def find(self, uri: str) -> ResourceTarget | None:
        templates: list[ResourceTarget] = []
        for target in self:
            if target.definition.template:
                templates.append(target)
            elif target.definition.uri == uri:
                return target
        return next((t for t in templates if t.matches(uri)), None)

    def resources(self) -> list[ResourceTarget]:
        return [t for t in self if not t.definition.template]

    def templates(self) -> list[ResourceTarget]:
        return [t for t in self if t.definition.template]

    def __iter__(self) -> Iterator[ResourceTarget]:
        return iter([t for targets in list(self._by_source.values()) for t in targets])

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_source.values())


def _shape(targets: list[ResourceTarget]) -> list[tuple[str, str, str | None, str | None]]:
    return [(t.definition.uri, t.served_name, t.definition.description, t.blocked) for t in targets]
