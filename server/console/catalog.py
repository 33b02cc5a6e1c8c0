"""What the catalog pages show: the tools, resources and prompts with their securables, who holds which
privilege on each (effective, read-only, from the local catalog), and quarantined upstream definitions
with a diff against the approved one."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from server.grants.local import LocalCatalog, ancestors
from server.grants.source import APPLICABLE
from server.identity import PRINCIPAL_KINDS, Principal
from server.prompts.catalog import PromptCatalog
from server.registry import ToolRegistry
from server.resources.catalog import ResourceCatalog
from server.target import Target
from server.upstream.pins import Pin, PinStore


@dataclass(frozen=True, slots=True)
class ToolEntry:
    name: str
    title: str
    description: str
    securable: str
    upstream: str
    status: str
    annotations: dict[str, Any] = field(default_factory=dict)


def tools(registry: ToolRegistry, pins: PinStore | None) -> list[ToolEntry]:
    """Every tool the gateway knows, served or not; quarantined ones from their pins too."""
    found: dict[str, ToolEntry] = {}
    for tool in registry:
        spec = tool.spec
        status = str(getattr(tool, "status", "served"))
        found[spec.name] = ToolEntry(spec.name, spec.title or "", spec.description, spec.securable,
                                     spec.upstream or "", "served" if status == "approved" else status,
                                     dict(spec.annotations))  # fmt: skip
    for pin in pins.list() if pins else []:
        if pin.tool not in found:
            d = pin.definition
            found[pin.tool] = ToolEntry(pin.tool, str(d.get("title") or ""), str(d.get("description") or ""), "",
                                        pin.upstream, pin.status, dict(d.get("annotations") or {}))  # fmt: skip
    return sorted(found.values(), key=lambda t: t.name)


@dataclass(frozen=True, slots=True)
class TargetEntry:
    """A resource, resource template or prompt: what it is, the securable it is governed as and the
    privilege using it needs there (`READ` on a resource, `EXECUTE` on a prompt's function)."""

    kind: str
    name: str
    title: str
    description: str
    securable: str
    needs: str
    upstream: str
    status: str
    detail: list[tuple[str, str]] = field(default_factory=list)
    """(label, value) facts of its kind: a resource's URI and media type, a prompt's arguments."""


def _entry(kind: str, target: Target, detail: list[tuple[str, str]]) -> TargetEntry:
    spec = target.spec
    needed = target.requirements()[-1]  # after USE CATALOG and USE SCHEMA: the target's own privilege
    status = f"blocked: {target.blocked}" if target.blocked else "served"
    needs = f"{needed.privilege} on {needed.securable_type}"
    return TargetEntry(kind, spec.name, spec.title or "", spec.description, spec.securable, needs,
                       spec.upstream or "", status, detail)  # fmt: skip


def resources(catalog: ResourceCatalog) -> list[TargetEntry]:
    """Every resource and template the upstreams serve (quarantined ones too, marked blocked)."""
    found = []
    for target in catalog:
        d = target.definition
        detail = [("URI template" if d.template else "URI", d.uri), ("Media type", d.mime_type or "")]
        found.append(_entry("resource template" if d.template else "resource", target, detail))
    return sorted(found, key=lambda e: e.name)


def prompts(catalog: PromptCatalog) -> list[TargetEntry]:
    """Every prompt the upstreams serve, with its declared arguments."""
    found = []
    for target in catalog:
        arguments = ", ".join(
            f"{a.get('name', '')}{'' if a.get('required') else ' (optional)'}" for a in target.definition.arguments
        )
        found.append(_entry("prompt", target, [("Arguments", arguments or "none")]))
    return sorted(found, key=lambda e: e.name)


@dataclass(frozen=True, slots=True)
class Holding:
    principal: str
    kind: str
    privileges: list[tuple[str, str]]
    """(privilege, where it comes from: "direct", "owner" or the ancestor it is inherited from)."""


def holders(catalog: LocalCatalog, securable: str) -> list[Holding]:
    """Every principal with a grant on `securable` or an ancestor of it (or its owner), and what it
    effectively holds there. Members of a group hold what the group holds (`castellan grants show`)."""
    names: dict[str, None] = {}
    for level in ancestors(securable):
        for grant in catalog.grants(securable=level):
            names[grant.principal] = None
    owner = catalog.owner(securable)
    if owner:
        names[owner] = None
    # what bears on using it: the privileges its type takes, and the USE privileges that reach it (an
    # EXECUTE inherited from the catalog means nothing on a resource)
    securable_type = catalog.securable_type(securable)
    relevant = APPLICABLE.get(securable_type or "", frozenset()) | {"USE CATALOG", "USE SCHEMA"}
    out = []
    for name in names:
        kind = catalog.kind_of(name) or "group"
        if kind not in PRINCIPAL_KINDS:
            continue
        detail = catalog.effective_detail([Principal(kind, name)], securable)
        privileges = [(d.privilege, d.inherited_from or ("owner" if owner == name else "direct")) for d in detail
                      if securable_type is None or d.privilege in relevant]  # fmt: skip
        if privileges:
            out.append(Holding(name, kind.replace("_", " "), sorted(privileges)))
    return sorted(out, key=lambda h: (h.kind, h.principal))


@dataclass(frozen=True, slots=True)
class Quarantine:
    pin: Pin
    diff: list[tuple[str, str]]
    """(kind, line): kind is "del" (only in the approved definition), "ins" (only in the one offered), "ctx"."""
    approved_known: bool


def _lines(definition: dict[str, Any]) -> list[str]:
    return json.dumps(definition, indent=2, sort_keys=True).splitlines()


def quarantined(pins: PinStore) -> list[Quarantine]:
    out = []
    for pin in pins.list():
        if pin.status != "quarantined":
            continue
        approved = pins.approved_definition(pin.tool)
        diff: list[tuple[str, str]] = []
        if approved is not None:
            for line in difflib.unified_diff(_lines(approved), _lines(pin.definition), "approved", "offered",
                                             lineterm="", n=3):  # fmt: skip
                if line.startswith(("---", "+++", "@@")):
                    diff.append(("hunk", line))
                elif line.startswith("-"):
                    diff.append(("del", line))
                elif line.startswith("+"):
                    diff.append(("ins", line))
                else:
                    diff.append(("ctx", line))
        else:
            diff = [("ins", f"+{line}") for line in _lines(pin.definition)]
        out.append(Quarantine(pin, diff, approved is not None))
    return out
