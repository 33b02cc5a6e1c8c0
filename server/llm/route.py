"""`POST /v1/chat/completions`: parse, authenticate, hand to the proxy, render OpenAI-shaped errors."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.auth.middleware import bearer_token
from server.errors import BackendUnavailable, CastellanError, Denied, Unauthenticated
from server.gateway import Gateway
from server.llm.proxy import BadRequest, UpstreamFailed
from server.request_id import request_id_of
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
    403: "Grants or policy refused the request (the model is a catalog securable)",
    404: "The LLM route is not configured (llm.upstream_url)",
    413: "The body is too large",
    429: "A rate limit or token budget refused the request (Retry-After says when to retry)",
    500: "An internal error (never an allow)",
    502: "The upstream model endpoint failed",
    503: "A backend (the meter store, the grant source, the policy engine, the audit log) cannot answer",
}


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, chunked or not, refused past `limit` bytes as soon as it gets there."""
    size, parts = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


def _refusal(exc: CastellanError) -> JSONResponse:
    reason = "; ".join(exc.reasons)
    if isinstance(exc, BackendUnavailable):
        return _error(503, reason, "service_unavailable")
    if isinstance(exc, Denied) and exc.stage == "admit":
        retry = _RETRY.search(reason)
        kind = "insufficient_quota" if "token budget" in reason else "rate_limit_exceeded"
        return _error(429, reason, kind, {"Retry-After": retry.group(1)} if retry else None)
    if isinstance(exc, Denied):
        return _error(403, f"{exc.stage}: {reason}", "permission_denied")
    return _error(500, reason, "internal_error")


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
    limit = gateway.settings.server.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isascii() or not length.isdigit()):
        return _error(400, "invalid Content-Length", "invalid_request_error")
    if length is not None and int(length) > limit:
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
        body: Any = json.loads(await _read_body(request, limit))
    except _TooLarge:
        return _error(413, "request body too large", "invalid_request_error")
    except ValueError:
        return _error(400, "the body is not JSON", "invalid_request_error")
    try:
        run = run_info(None, request.headers, fallback=uuid.uuid4().hex)
        prepared = await proxy.prepare(identity, body, run, request_id_of(request.scope))
    except BadRequest as exc:
        return _error(400, str(exc), "invalid_request_error")
    if prepared.call.error is not None:
        return _refusal(prepared.call.error)
    if prepared.request.stream:
        return StreamingResponse(proxy.stream(prepared), media_type="text/event-stream")
    try:
        return JSONResponse(await proxy.complete(prepared))
    except UpstreamFailed as exc:
        if isinstance(exc.body, dict) and "error" in exc.body:
            return JSONResponse(exc.body, status_code=exc.status)
        return _error(exc.status, str(exc), "upstream_error")


def add_llm_routes(app: FastAPI) -> None:
    app.include_router(router)
