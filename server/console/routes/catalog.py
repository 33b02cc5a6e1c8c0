"""Catalog pages: tools, resources and prompts and their securables, who holds what, quarantined upstream
definitions."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.console import catalog
from server.console.context import console_of
from server.grants.local import LocalCatalog
from server.upstream.pins import PinStore


def _pins(request: Request) -> PinStore | None:
    upstreams = console_of(request).gateway.upstreams
    return upstreams.pins if upstreams is not None else None


async def catalog_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    pins = _pins(request)
    entries = await asyncio.to_thread(catalog.tools, console.gateway.registry, pins)
    held = await asyncio.to_thread(catalog.quarantined, pins) if pins else []
    resources, prompts = _targets(request)
    return console.render(request, "catalog/tools.html", user, tools=entries, quarantined=held,
                          resources=resources, prompts=prompts,
                          grants_backend=console.gateway.settings.grants.backend)  # fmt: skip


def _targets(request: Request) -> tuple[list[catalog.TargetEntry], list[catalog.TargetEntry]]:
    surface = console_of(request).gateway.surface
    if surface is None:
        return [], []
    return catalog.resources(surface.resources), catalog.prompts(surface.prompts)


async def resource_page(request: Request) -> Response:
    return await _target_page(request, "resources")


async def prompt_page(request: Request) -> Response:
    return await _target_page(request, "prompts")


async def _target_page(request: Request, kind: str) -> Response:
    """One resource or prompt: what it is, its securable, and who holds what on it (read-only)."""
    console = console_of(request)
    user = await console.require(request)
    name = request.path_params["name"]
    resources, prompts = _targets(request)
    entry = next((e for e in (resources if kind == "resources" else prompts) if e.name == name), None)
    if entry is None:
        return console.render(request, "not_found.html", user, status=404, what=f"No {kind[:-1]} {name}.")
    source = console.gateway.grant_source
    holdings = None
    if isinstance(source, LocalCatalog) and entry.securable:
        holdings = await asyncio.to_thread(catalog.holders, source, entry.securable)
    return console.render(request, "catalog/target.html", user, target=entry, holdings=holdings,
                          grants_backend=console.gateway.settings.grants.backend)  # fmt: skip


async def tool_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    name = request.path_params["name"]
    pins = _pins(request)
    entries = {t.name: t for t in await asyncio.to_thread(catalog.tools, console.gateway.registry, pins)}
    entry = entries.get(name)
    if entry is None:
        return console.render(request, "not_found.html", user, status=404, what=f"No tool {name}.")
    source = console.gateway.grant_source
    holdings = None
    if isinstance(source, LocalCatalog) and entry.securable:
        holdings = await asyncio.to_thread(catalog.holders, source, entry.securable)
    held = [q for q in (await asyncio.to_thread(catalog.quarantined, pins) if pins else []) if q.pin.tool == name]
    return console.render(request, "catalog/tool.html", user, tool=entry, holdings=holdings, quarantine=held,
                          grants_backend=console.gateway.settings.grants.backend)  # fmt: skip


ROUTES = [
    Route("/catalog", catalog_page, methods=["GET"]),
    Route("/catalog/tools/{name:path}", tool_page, methods=["GET"]),
    Route("/catalog/resources/{name:path}", resource_page, methods=["GET"]),
    Route("/catalog/prompts/{name:path}", prompt_page, methods=["GET"]),
]
