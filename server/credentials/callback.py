"""`GET /oauth/callback`: where an upstream's authorization server sends a user back with a code."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from server.credentials.brokered import CALLBACK_PATH, BrokeredCredential
from server.credentials.store import GrantStore
from server.errors import BackendUnavailable, Denied

log = structlog.get_logger("castellan.credentials")


def add_callback_route(app: FastAPI, brokered: Mapping[str, BrokeredCredential], store: GrantStore) -> None:
    """The callback completes the pending authorization its `state` names (once), for the user who asked
    for the link. Plain-text answers: a person reads them in a browser tab."""

    async def callback(request: Request) -> PlainTextResponse:
        query = request.query_params
        state = query.get("state", "")
        pending = await asyncio.to_thread(store.take, state) if state else None
        if pending is None or pending.upstream not in brokered:
            return PlainTextResponse("This authorization link is unknown, used or expired: ask for a new one.", 400)
        if "error" in query:
            log.info("brokered_authorization_refused", upstream=pending.upstream, error=query["error"])
            return PlainTextResponse(f"The authorization was not granted ({query['error'][:100]}).", 400)
        code = query.get("code", "")
        if not code:
            return PlainTextResponse("The authorization server sent no code.", 400)
        try:
            scope = await brokered[pending.upstream].complete(pending.subject, code, pending.code_verifier)
        except Denied as exc:
            return PlainTextResponse(f"Authorization failed: {'; '.join(exc.reasons)}", 400)
        except BackendUnavailable as exc:
            return PlainTextResponse(f"Authorization failed: {'; '.join(exc.reasons)}", 503)
        return PlainTextResponse(
            f"{pending.upstream} is authorized for {pending.subject} (scope: {scope or 'default'}). "
            "You can close this tab and retry the call."
        )

    app.add_api_route(CALLBACK_PATH, callback, methods=["GET"], include_in_schema=False)
