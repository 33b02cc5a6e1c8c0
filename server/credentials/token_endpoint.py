"""POSTs of forms to an OAuth token endpoint (RFC 6749 section 3.2), as the gateway's upstream
credentials make them: token exchange (RFC 8693) and the brokered grants' code and refresh requests."""

from __future__ import annotations

from typing import Any

import aiohttp

from server.errors import BackendUnavailable

STAGE = "credentials"


class TokenEndpoint:
    """One pooled HTTP session for one credential's token requests (kept-alive connections instead of a
    TCP and TLS handshake per exchange), opened at the first request and closed by `close()` at gateway
    shutdown. After `close()` a request raises `BackendUnavailable`."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def post_form(
        self, url: str, form: dict[str, str], auth: aiohttp.BasicAuth | None, timeout_seconds: float, unreachable: str
    ) -> tuple[int, Any]:
        """The endpoint's status and JSON body (whatever it is). Raises `BackendUnavailable` with
        `unreachable` (naming the upstream and the server) when no answer comes, or it is not JSON."""
        if self._closed:
            raise BackendUnavailable(STAGE, f"{unreachable} (the gateway is shutting down)")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return await _post(self._session, url, form, auth, timeout_seconds, unreachable)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


async def post_form(
    url: str, form: dict[str, str], auth: aiohttp.BasicAuth | None, timeout_seconds: float, unreachable: str
) -> tuple[int, Any]:
    """One request on a session of its own, for callers without a lifecycle to hold a `TokenEndpoint`."""
    async with aiohttp.ClientSession() as session:
        return await _post(session, url, form, auth, timeout_seconds, unreachable)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    form: dict[str, str],
    auth: aiohttp.BasicAuth | None,
    timeout_seconds: float,
    unreachable: str,
) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        async with session.post(url, data=form, auth=auth, timeout=timeout) as resp:
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise BackendUnavailable(STAGE, f"{unreachable} ({type(exc).__name__})") from None
