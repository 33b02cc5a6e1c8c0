"""`POST /v1/chat/completions`: parse, authenticate, hand to the proxy, render OpenAI-shaped errors."""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.auth.middleware import bearer_token
from server.errors import BackendUnavailable, Denied, Unauthenticated
from server.gateway import Gateway
from server.llm.proxy import BadRequest, UpstreamFailed
from server.runs import run_info

router = APIRouter(tags=["llm"])
_RETRY = re.compile(r"retry_after=(\d+)s")


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": kind}}, status_code=status, headers=headers
    )


_ERROR_STATUSES = {
    400: "The body is not a valid chat completion request",
    401: "No valid bearer token",
    404: "The LLM route is not configured (llm.upstream_url)",
    413: "The body is too large",
    429: "A rate limit or token budget refused the request (Retry-After says when to retry)",
    502: "The upstream model endpoint failed",
    503: "A backend (the meter store, the audit log) cannot answer",
}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={status: {"description": text} for status, text in _ERROR_STATUSES.items()},
)
async def chat_completions(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    proxy = gateway.llm
    if proxy is None:
        return _error(404, "the LLM route is not configured (llm.upstream_url)", "not_found")
    if int(request.headers.get("content-length") or 0) > gateway.settings.server.max_body_bytes:
        return _error(413, "request body too large", "invalid_request_error")
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        return _error(401, "bearer token required", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
    try:
        identity = await gateway.verifier.verify(token)
    except Unauthenticated as exc:
        return _error(
            401,
            f"unauthorized: {exc.description}",
            "invalid_api_key",
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    try:
        body: Any = await request.json()
    except ValueError:
        return _error(400, "the body is not JSON", "invalid_request_error")
    try:
        prepared = await proxy.prepare(identity, body, run_info(None, request.headers, fallback=uuid.uuid4().hex))
    except BadRequest as exc:
        return _error(400, str(exc), "invalid_request_error")
    except Denied as exc:
        reason = "; ".join(exc.reasons)
        retry = _RETRY.search(reason)
        kind = "insufficient_quota" if "token budget" in reason else "rate_limit_exceeded"
        return _error(429, reason, kind, {"Retry-After": retry.group(1)} if retry else None)
    except BackendUnavailable as exc:
        return _error(503, "; ".join(exc.reasons), "service_unavailable")
    if prepared.body.get("stream"):
        return StreamingResponse(proxy.stream(prepared), media_type="text/event-stream")
    try:
        return JSONResponse(await proxy.complete(prepared))
    except UpstreamFailed as exc:
        if isinstance(exc.body, dict) and "error" in exc.body:
            return JSONResponse(exc.body, status_code=exc.status)
        return _error(exc.status, str(exc), "upstream_error")


def add_llm_routes(app: FastAPI) -> None:
    app.include_router(router)
