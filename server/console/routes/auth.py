"""Sign in: at the gateway's authorization server (OAuth code + PKCE) or with a pasted bearer token, both
verified by the gateway's own verifier before any session cookie is set; sign out."""

from __future__ import annotations

import secrets
import time

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from server.console.context import console_of, redirect
from server.console.oauth import SignInFailed
from server.console.roles import AUDIT_SCOPE, may_enter, roles_from_scopes
from server.console.session import COOKIE, FLOW_COOKIE, PRE_COOKIE
from server.errors import Unauthenticated

log = structlog.get_logger("castellan.console")
_COOKIE_PATH = "/console"
_MAX_COOKIE = 4_000  # browsers keep cookies up to 4096 bytes
_FLOW_PATH = "/console/oauth"


async def sign_in_page(request: Request) -> Response:
    console = console_of(request)
    if await console.user(request) is not None:
        return redirect("/console/audit", request)
    return _sign_in(request, None)


def _sign_in(request: Request, error: str | None, status: int = 200) -> Response:
    console = console_of(request)
    pre = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(16)
    oauth = console.oauth.label if console.oauth is not None else None
    response = console.render(request, "sign_in.html", None, status=status, binding=pre, error=error, oauth=oauth)
    response.set_cookie(
        PRE_COOKIE, pre, path=_COOKIE_PATH, httponly=True, secure=console.secure_cookies, samesite="strict",
        max_age=3600,
    )  # fmt: skip
    return response


async def sign_in(request: Request) -> Response:
    form = await request.form()
    token = str(form.get("token") or "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        return _sign_in(request, "Paste a bearer token.", 400)
    return await _establish(request, token, "token", redirect("/console/audit", request))


async def _establish(request: Request, token: str, how: str, then: Response) -> Response:
    """Verify `token` as the gateway verifies any, and only then seal it into the session cookie on `then`."""
    console = console_of(request)
    try:
        identity = await console.gateway.verifier.verify(token)
    except Unauthenticated as exc:
        log.info("console_sign_in_refused", how=how, why=exc.description)
        return _sign_in(request, f"The token was refused: {exc.description}", 401)
    if not may_enter(roles_from_scopes(identity.scopes)):
        log.info("console_sign_in_refused", how=how, agent_id=identity.agent_id, why="no castellan:audit scope")
        return _sign_in(request, f"This token does not hold the {AUDIT_SCOPE} scope, which the console needs.", 403)
    cookie, _ = console.sealer.seal(token)
    if len(cookie) > _MAX_COOKIE:
        return _sign_in(request, "This token is too large to keep in a browser session.", 400)
    log.info(
        "console_signed_in", how=how, agent_id=identity.agent_id, subject=identity.subject, scopes=list(identity.scopes)
    )
    max_age = int(console.sealer.max_age)
    if identity.expires_at:
        max_age = max(1, min(max_age, int(identity.expires_at - time.time())))
    then.set_cookie(
        COOKIE, cookie, path=_COOKIE_PATH, httponly=True, secure=console.secure_cookies, samesite="strict",
        max_age=max_age,
    )  # fmt: skip
    then.delete_cookie(PRE_COOKIE, path=_COOKIE_PATH)
    return then


async def oauth_start(request: Request) -> Response:
    """Send the browser to the authorization server, with the flow sealed in a cookie for the callback."""
    console = console_of(request)
    if console.oauth is None:
        return _sign_in(request, "This gateway knows no authorization server: sign in with a token.", 404)
    try:
        url, flow = await console.oauth.start()
    except SignInFailed as exc:
        log.info("console_oauth_unavailable", issuer=console.oauth.issuer, why=str(exc))
        return _sign_in(request, f"Sign-in with {console.oauth.label} is unavailable: {exc}", 502)
    response = Response(status_code=303, headers={"Location": url, "Cache-Control": "no-store"})
    # Lax, not Strict: the authorization server's redirect back is a navigation from its site, and a
    # Strict cookie would not come along (when the server is on another site, as Hydra is).
    response.set_cookie(
        FLOW_COOKIE, console.sealer.seal_flow(flow), path=_FLOW_PATH, httponly=True, secure=console.secure_cookies,
        samesite="lax", max_age=600,
    )  # fmt: skip
    return response


async def oauth_callback(request: Request) -> Response:
    """The authorization server's redirect: state checked, code exchanged, token verified, session set."""
    console = console_of(request)
    if console.oauth is None:
        return _sign_in(request, "This gateway knows no authorization server: sign in with a token.", 404)
    flow = console.sealer.open_flow(request.cookies.get(FLOW_COOKIE))
    try:
        token = await console.oauth.finish(flow, dict(request.query_params))
    except SignInFailed as exc:
        log.info("console_sign_in_refused", how="oauth", why=str(exc))
        response = _sign_in(request, f"Sign-in with {console.oauth.label} failed: {exc}", 400)
    else:
        response = await _establish(request, token, "oauth", _continue_page())
    response.delete_cookie(FLOW_COOKIE, path=_FLOW_PATH, httponly=True, secure=console.secure_cookies, samesite="lax")
    return response


def _continue_page() -> Response:
    """Onward to the console by a page of its own rather than a redirect: this request came from the
    authorization server's site, and the browser sends the Strict session cookie only on a navigation
    that starts on the console's."""
    body = (
        '<!doctype html><html lang=en><meta charset=utf-8><meta http-equiv="refresh" content="0;url=/console/audit">'
        "<title>Signed in</title><main><p>Signed in. <a href=/console/audit>Continue to the console</a>.</p></main>"
    )
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})


async def sign_out(request: Request) -> Response:
    console = console_of(request)
    response = redirect("/console/sign-in", request)
    response.delete_cookie(COOKIE, path=_COOKIE_PATH, httponly=True, secure=console.secure_cookies, samesite="strict")
    return response


ROUTES = [
    Route("/sign-in", sign_in_page, methods=["GET"]),
    Route("/sign-in", sign_in, methods=["POST"]),
    Route("/sign-out", sign_out, methods=["POST"]),
    Route("/oauth/start", oauth_start, methods=["GET"]),
    Route("/oauth/callback", oauth_callback, methods=["GET"]),
]
