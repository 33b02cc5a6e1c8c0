"""One POST of a form to an OAuth token endpoint (RFC 6749 section 3.2), as the gateway's upstream
credentials make it: token exchange (RFC 8693) and the brokered grants' code and refresh requests."""

from __future__ import annotations

from typing import Any

import aiohttp

from server.errors import BackendUnavailable

STAGE = "credentials"


async def post_form(
    url: str, form: dict[str, str], auth: aiohttp.BasicAuth | None, timeout_seconds: float, unreachable: str
) -> tuple[int, Any]:
    """The endpoint's status and JSON body (whatever it is). Raises `BackendUnavailable` with
    `unreachable` (naming the upstream and the server) when no answer comes, or it is not JSON."""
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=form, auth=auth) as resp,
        ):
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise BackendUnavailable(STAGE, f"{unreachable} ({type(exc).__name__})") from None
