"""The resource catalog: every resource and template the gateway serves, by source, found by URI."""

from __future__ import annotations

from server.resources.target import ResourceTarget
from server.target_catalog import TargetCatalog


class ResourceCatalog(TargetCatalog[ResourceTarget]):
    """Resources and templates from each source. A URI is served by one source only: a resource whose
    URI (or template), or securable, another source already serves is refused by `collision` and the
    first keeps serving. `find` prefers a resource's exact URI to a template that matches it; among
    templates, the first registered."""

    def _clashes(
        self, target: ResourceTarget, source: str, other: ResourceTarget, other_source: str | None
    ) -> str | None:
        kind = "template" if target.definition.template else "resource"
        uri = target.definition.uri
        if other_source is None:
            if other.spec.securable.casefold() == target.spec.securable.casefold():
                return f"{kind} {uri!r} of {source} has the securable of {other.definition.uri!r}"
            return None
        if other.definition.uri == uri or other.spec.securable == target.spec.securable:
            return f"{kind} {uri!r} of {source} collides with {other_source}'s; theirs keeps serving"
        return None

    def _shape(self, target: ResourceTarget) -> tuple[str, str, str | None, str | None]:
        return (target.definition.uri, target.served_name, target.definition.description, target.blocked)

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
