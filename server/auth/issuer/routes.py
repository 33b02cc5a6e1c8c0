"""The dev issuer's HTTP endpoints on the gateway: metadata, JWKS, sign-in (authorize), token, registration."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import structlog
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749.util import scope_to_list
from starlette.datastructures import FormData, QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from server.auth.issuer.client_documents import ClientDocumentError, is_document_url
from server.auth.issuer.identities import demo_identity
from server.auth.issuer.page import error_page, sign_in_page
from server.auth.issuer.server import (
    AUTHORIZE_PATH,
    JWKS_PATH,
    REGISTER_PATH,
    TOKEN_PATH,
    DevIssuer,
    FormRequest,
    Reply,
    json_request,
)
from server.auth.issuer.store import SignIn
from server.auth.strict_json import loads_strict

log = structlog.get_logger("castellan.issuer")

METADATA_PATH = "/.well-known/oauth-authorization-server"
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action *; frame-ancestors 'none'",
}
_CORS = {
    "Access-Control-Allow-Origin": "*",  # public endpoints, for browser-based clients (the MCP Inspector)
    "Access-Control-Allow-Headers": "Authorization, Content-Type, MCP-Protocol-Version",
}
_OWN_FIELDS = ("identity", "grant_scope", "decision")


def _http(reply: Reply) -> Response:
    headers = dict(reply.headers)
    if reply.location is not None:
        return RedirectResponse(reply.location, status_code=302, headers={"Cache-Control": "no-store"})
    return JSONResponse(reply.body, status_code=reply.status, headers={**headers, **_CORS})


def _datalist(items: QueryParams | FormData, *, skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in items.multi_items():
        if key not in skip and isinstance(value, str):
            found.setdefault(key, []).append(value)
    return found


async def _resolve_document(issuer: DevIssuer, client_id: str | None) -> str | None:
    """Fetch a client ID metadata document before authlib looks the client up; the error, if any."""
    if client_id and is_document_url(client_id) and issuer.client(client_id) is None:
        try:
            await issuer.documents.resolve(client_id)
        except ClientDocumentError as exc:
            log.info("client_document_refused", client_id=client_id, reason=str(exc))
            return f"client {client_id}: {exc}"
    return None


def issuer_routes(issuer: DevIssuer) -> list[Route]:
    """Routes to mount at the gateway's root (the issuer is the gateway's base URL)."""
    server = issuer.server
    issuer_path = urlsplit(issuer.issuer).path.rstrip("/")

    async def metadata(request: Request) -> Response:
        return JSONResponse(issuer.metadata(), headers=_CORS)

    async def jwks(request: Request) -> Response:
        return JSONResponse(issuer.public_keys(), headers=_CORS)

    async def preflight(request: Request) -> Response:
        return Response(status_code=204, headers={**_CORS, "Access-Control-Allow-Methods": "GET, POST, OPTIONS"})

    def _oauth_request(request: Request, datalist: dict[str, list[str]]) -> FormRequest | None:
        try:
            return FormRequest(request.method, str(request.url), request.headers, datalist)
        except OAuth2Error:  # authlib's InsecureTransportError: plain http to a host that is not loopback
            return None

    async def authorize(request: Request) -> Response:
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin is not None and origin.rstrip("/") != _origin(issuer.issuer):
                return HTMLResponse(error_page("sign-in posted from another site"), 403, headers=_PAGE_HEADERS)
            form = await request.form()
            datalist = _datalist(form, skip=_OWN_FIELDS)
        else:
            form = None
            datalist = _datalist(request.query_params)
        refused = await _resolve_document(issuer, _first(datalist, "client_id"))
        if refused is not None:
            return HTMLResponse(error_page(refused), 400, headers=_PAGE_HEADERS)
        oauth = _oauth_request(request, datalist)
        if oauth is None:
            return HTMLResponse(error_page("the dev issuer answers over https or on loopback only"), 400)
        try:
            grant = server.get_consent_grant(oauth)
        except OAuth2Error as error:
            if error.redirect_uri:
                return _http(server.handle_error_response(oauth, error))
            return HTMLResponse(error_page(error.get_error_description() or error.error), 400, headers=_PAGE_HEADERS)
        requested = scope_to_list(oauth.scope) or []
        if form is None:
            page = sign_in_page(
                action=f"{issuer_path}{AUTHORIZE_PATH}",
                client=grant.client,
                redirect_uri=grant.redirect_uri,
                params={k: v[0] for k, v in datalist.items()},
                requested=requested,
                identities=issuer.identities(),
            )
            return HTMLResponse(page, headers=_PAGE_HEADERS)
        identity = demo_identity(str(form.get("identity", "")))
        if form.get("decision") != "allow" or identity is None:
            grant_user: SignIn | None = None
        else:
            chosen = {str(v) for v in form.getlist("grant_scope")}
            wanted = requested or list(identity.default_scopes())
            granted = [s for s in identity.grantable(wanted) if s in chosen or not requested]
            grant_user = SignIn(identity, tuple(granted))
            log.info(
                "dev_sign_in",
                identity=identity.name,
                client_id=grant.client.client_id,
                requested=requested,
                granted=granted,
            )
        return _http(server.create_authorization_response(oauth, grant_user=grant_user, grant=grant))

    async def token(request: Request) -> Response:
        datalist = _datalist(await request.form())
        refused = await _resolve_document(issuer, _first(datalist, "client_id"))
        if refused is not None:
            return JSONResponse({"error": "invalid_client", "error_description": refused}, 401, headers=_CORS)
        oauth = _oauth_request(request, datalist)
        if oauth is None:
            return JSONResponse({"error": "invalid_request", "error_description": "https or loopback only"}, 400)
        return _http(server.create_token_response(oauth))

    async def register(request: Request) -> Response:
        try:
            data: Any = loads_strict(await request.body())
        except ValueError:
            data = None
        if not isinstance(data, dict):
            body = {"error": "invalid_client_metadata", "error_description": "the body is not a JSON object"}
            return JSONResponse(body, 400, headers=_CORS)
        reply = server.create_endpoint_response(
            "client_registration", json_request(request.method, str(request.url), request.headers, data)
        )
        if reply.status == 201:
            log.info("dev_client_registered", client_id=reply.body.get("client_id"), name=reply.body.get("client_name"))
        return _http(reply)

    metadata_paths = {METADATA_PATH + issuer_path, METADATA_PATH}
    routes = [Route(p, metadata, methods=["GET"]) for p in sorted(metadata_paths)]
    routes += [Route(p, preflight, methods=["OPTIONS"]) for p in sorted(metadata_paths)]
    routes += [
        Route(JWKS_PATH, jwks, methods=["GET"]),
        Route(AUTHORIZE_PATH, authorize, methods=["GET", "POST"]),
        Route(TOKEN_PATH, token, methods=["POST"]),
        Route(REGISTER_PATH, register, methods=["POST"]),
        *(Route(p, preflight, methods=["OPTIONS"]) for p in (JWKS_PATH, TOKEN_PATH, REGISTER_PATH)),
    ]
    return routes


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _first(datalist: dict[str, list[str]], name: str) -> str | None:
    values = datalist.get(name)
    return values[0] if values else None
