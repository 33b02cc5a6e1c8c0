"""The charts page."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.console import charts
from server.console.context import console_of


async def charts_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    if console.index is None:
        return console.render(request, "unavailable.html", user, status=501, what="This audit backend has no search.")
    window = request.query_params.get("window", "7d")
    if window not in charts.WINDOWS:
        window = "7d"
    state = await console.index.refresh()
    gateway = console.gateway
    found = [
        *await charts.over_time(console.index, window),
        await charts.token_spend(console.index, gateway.meter, gateway.settings.metering, window),
        await charts.denial_reasons(console.index, window),
        await charts.policy_versions(console.index, window),
        await charts.shadow_disagreements(console.index, window),
    ]
    return console.render(request, "charts.html", user, charts=found, window=window, windows=list(charts.WINDOWS),
                          index=state)  # fmt: skip


ROUTES = [Route("/charts", charts_page, methods=["GET"])]
