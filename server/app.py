"""The app factory: the one place that reads settings and builds the FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.routing import Route

from server import __version__, heap
from server.admin import ADMIN_SCOPE, add_admin_routes, authorize
from server.approvals.routes import add_approval_routes
from server.auth.issuer.routes import issuer_routes
from server.auth.issuer.server import build_dev_issuer
from server.auth.metadata import authorization_servers, metadata_path, metadata_url, protected_resource_metadata
from server.auth.middleware import BearerAuthMiddleware
from server.auth.scopes import tool_scopes
from server.console.app import close_console, mount_console
from server.credentials.brokered import BrokeredCredential
from server.credentials.callback import add_callback_route
from server.gateway import Gateway, build_gateway
from server.gateway_app import MCP_PATH, GatewayApp
from server.llm.route import add_llm_routes
from server.protocol.fast import FastEdge
from server.protocol.relay_http import RelayingSessions
from server.protocol.server import build_mcp_server
from server.registry import Tool
from server.request_id import RequestIdMiddleware, request_id_of
from server.settings import Settings
from server.transport import TransportGuard, allowed_hosts, allowed_origins, sdk_settings

log = structlog.get_logger("castellan")

METRICS_SCOPE = "castellan:metrics"
DEV_TOKEN_HINT = (
    "dev mode: mint a token with `castellan token --agent NAME --groups analysts` (same directory and "
    "CASTELLAN_* settings as the gateway, or --url {url}) and send `Authorization: Bearer <token>`, "
    "or sign in with an OAuth-capable MCP client (the gateway's dev issuer)"
)


def create_app(settings: Settings, tools: list[Tool] | None = None, *, settle_heap: bool = False) -> GatewayApp:
    gateway = build_gateway(settings, tools)
    hosts = allowed_hosts(settings.base_url, settings.server.allowed_hosts)
    origins = allowed_origins(settings.base_url, settings.server.allowed_origins)
    mcp_server = build_mcp_server(gateway.handlers, gateway.registry, gateway.surface)
    sessions = StreamableHTTPSessionManager(
        app=mcp_server,
        json_response=settings.server.json_response,
        stateless=settings.server.stateless,
        security_settings=sdk_settings(hosts, origins),
        max_request_body_size=settings.server.max_body_bytes,
        session_idle_timeout=settings.server.session_idle_timeout_seconds,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with sessions.run():
            await gateway.start()
            if settle_heap:  # the served process only: a test's apps come and go in one process
                heap.settle()  # server/heap.py
            log.info(
                "gateway_started",
                url=settings.resource_url,
                policy_engine=gateway.engine.name,
                policy_engine_url=getattr(gateway.engine, "url", None),
            )
            try:
                yield
            finally:
                if settings.console.enabled:
                    close_console(app)
                await gateway.close()
                if dev_issuer is not None:
                    dev_issuer.close()

    app = GatewayApp(title="Castellan", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway

    scopes = tool_scopes(settings)
    metadata_document = protected_resource_metadata(
        settings.resource_url,
        authorization_servers(settings),
        settings.auth.scopes_supported or scopes.supported(),
    )
    dev_issuer = build_dev_issuer(settings, settings.auth.scopes_supported or scopes.supported())
    edge = FastEdge(
        RelayingSessions(sessions).handle_request,
        gateway.handlers,
        gateway.registry,
        mcp_server,
        sdk_settings(hosts, origins),
        json_response=settings.server.json_response and settings.server.fast_path,
        sessions=sessions,
        levels=gateway.surface.levels if gateway.surface is not None else None,
    )
    app.state.edge = edge
    endpoint = TransportGuard(
        BearerAuthMiddleware(
            edge,
            gateway.verifier,
            metadata_url(settings.base_url, settings.resource_url),
            gateway.metrics,
            hint=DEV_TOKEN_HINT.format(url=settings.resource_url) if settings.auth.mode == "dev" else "",
            scopes=scopes,
            presented=gateway.presented_tokens,
        ),
        hosts=hosts,
        origins=origins,
        max_body_bytes=settings.server.max_body_bytes,
    )
    app.router.routes.append(Route(MCP_PATH, endpoint=endpoint, methods=["GET", "POST", "DELETE"]))
    app.mcp = endpoint  # dispatched at the top of the app (server/gateway_app.py); the route stays for the rest
    _add_operational_routes(app, gateway, metadata_document)
    if dev_issuer is not None:  # dev mode's own OAuth authorization server (docs/identity.md)
        app.router.routes.extend(issuer_routes(dev_issuer))
    add_admin_routes(app)
    if gateway.grant_store is not None:  # brokered upstream grants: the authorization server returns here
        brokered = {n: c for n, c in gateway.upstream_credentials.items() if isinstance(c, BrokeredCredential)}
        add_callback_route(app, brokered, gateway.grant_store)
    add_approval_routes(app)
    add_llm_routes(app)
    if settings.console.enabled:
        mount_console(app, gateway)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_operational_routes(app: FastAPI, gateway: Gateway, metadata: dict[str, object]) -> None:
    resource_path = metadata_path(gateway.settings.resource_url)

    async def protected_resource() -> JSONResponse:
        return JSONResponse(metadata)

    app.add_api_route(resource_path, protected_resource, methods=["GET"], include_in_schema=False)
    if resource_path != "/.well-known/oauth-protected-resource":
        app.add_api_route(
            "/.well-known/oauth-protected-resource",
            protected_resource,
            methods=["GET"],
            include_in_schema=False,
        )

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "A backend cannot answer"}})
    async def readyz() -> JSONResponse:
        """Every backend can answer: policy engine, grant source, meter store, audit outbox. `degraded`
        (still 200) while a policy edit on disk was refused and the last good version decides."""
        checks = await gateway.readiness()
        # degraded (still 200): a check that says so, or a refused policy edit (the last good one decides)
        ready = all(v == "ok" or v.startswith("degraded") for v in checks.values())
        policy = gateway.policy_status()
        degraded = "refused_edit" in policy or any(v != "ok" for v in checks.values())
        status = "not ready" if not ready else "degraded" if degraded else "ready"
        return JSONResponse({"status": status, "checks": checks, "policy": policy}, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"},
            401: {"description": "No valid bearer token (with server.metrics_auth = 'token')"},
            403: {"description": "The token lacks castellan:metrics (with server.metrics_auth = 'token')"},
        },
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text format. With `server.metrics_auth = "token"`: a bearer token with `castellan:metrics`
        (or `castellan:admin`) is required."""
        if gateway.settings.server.metrics_auth == "token":
            await authorize(request, METRICS_SCOPE, ADMIN_SCOPE)
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return JSONResponse({"error": "internal error", "request_id": request_id_of(request.scope)}, status_code=500)
