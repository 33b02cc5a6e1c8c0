"""Which credential a call carries to an upstream: the gateway's own, an exchanged token, a brokered grant.

Never the agent's token: the exchanged token is a new one, issued for the upstream's audience by the
token service; the brokered one is the user's own grant at the upstream's authorization server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol

from server.auth.presented import PresentedTokens
from server.credentials.brokered import BrokeredCredential
from server.credentials.exchange import TokenExchanger
from server.credentials.sealing import Sealer
from server.credentials.secrets import read_secret
from server.credentials.store import GrantStore
from server.credentials.token_endpoint import STAGE
from server.errors import ConfigError, Denied
from server.identity import Identity
from server.settings import SecretSource, Settings, UpstreamSettings


def gateway_headers(settings: UpstreamSettings) -> dict[str, str]:
    """The headers the gateway's own connection sends (to connect, list tools, and call in `gateway` mode)."""
    headers = dict(settings.headers)
    token = ""
    if settings.token_env:
        token = os.environ.get(settings.token_env, "")
    elif settings.token_file is not None:
        try:
            token = read_secret(SecretSource(file=settings.token_file), f"upstream {settings.name} token_file")
        except ConfigError:
            token = ""  # the connection fails as unauthenticated, and says so at the next refresh
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def credential_source(settings: UpstreamSettings) -> str:
    """Where the upstream's credential comes from, for `castellan check-config` (never its value)."""
    if settings.credential == "token_exchange" and settings.token_exchange is not None:
        te = settings.token_exchange
        return (
            f"token exchange (RFC 8693) at {te.token_url} as client {te.client_id} "
            f"(secret from {te.client_secret.describe()}) for audience {te.audience or settings.url}"
        )
    if settings.credential == "brokered" and settings.oauth is not None:
        secret = settings.oauth.client_secret
        how = f"secret from {secret.describe()}" if secret.env or secret.file else "a public client"
        return (
            f"per-user grants brokered at {settings.oauth.authorize_url} as client {settings.oauth.client_id} ({how})"
        )
    if settings.token_env:
        return f"the gateway's own token from env {settings.token_env}"
    if settings.token_file is not None:
        return f"the gateway's own token from file {settings.token_file}"
    return "the gateway's own headers" if settings.headers else "none (an open upstream)"


def credential_check(settings: UpstreamSettings) -> tuple[bool, str]:
    """Whether the upstream's static secrets can be read, and where they come from (never their values)."""
    source = credential_source(settings)
    secrets: list[tuple[str, SecretSource]] = []
    if settings.token_env:
        secrets.append(("token_env", SecretSource(env=settings.token_env)))
    elif settings.token_file is not None:
        secrets.append(("token_file", SecretSource(file=settings.token_file)))
    if settings.credential == "token_exchange" and settings.token_exchange is not None:
        secrets.append(("token_exchange.client_secret", settings.token_exchange.client_secret))
    oauth = settings.oauth if settings.credential == "brokered" else None
    if oauth is not None and (oauth.client_secret.env or oauth.client_secret.file):  # else a public client
        secrets.append(("oauth.client_secret", oauth.client_secret))
    for what, secret in secrets:
        try:
            read_secret(secret, what)
        except ConfigError as exc:
            return False, f"{source}: {exc}"
    return True, source


class UpstreamCredential(Protocol):
    """The per-call headers for an upstream, for the caller. Raises `Denied` (no credential for this
    caller: the reason says how to get one) or `BackendUnavailable` (the token service is down)."""

    mode: str

    async def headers_for(self, identity: Identity | None) -> dict[str, str] | None: ...

    async def close(self) -> None:
        """Free what it holds (pooled connections to a token service); at gateway shutdown."""


class GatewayCredential:
    """The connection's own headers serve every call (None: nothing per call)."""

    mode = "gateway"

    async def headers_for(self, identity: Identity | None) -> dict[str, str] | None:
        return None

    async def close(self) -> None:
        return None


class ExchangedCredential:
    """The caller's token, exchanged (RFC 8693) for one for this upstream's audience."""

    mode = "token_exchange"

    def __init__(self, upstream: str, exchanger: TokenExchanger, presented: PresentedTokens) -> None:
        self._upstream = upstream
        self._exchanger = exchanger
        self._presented = presented

    async def headers_for(self, identity: Identity | None) -> dict[str, str] | None:
        if identity is None:
            raise Denied(STAGE, f"upstream {self._upstream} needs the caller's identity")
        subject_token = self._presented.token_of(identity)
        if subject_token is None:
            raise Denied(STAGE, f"upstream {self._upstream}: the caller's token is not at hand to exchange")
        return {"Authorization": f"Bearer {await self._exchanger.token_for(subject_token)}"}

    async def close(self) -> None:
        await self._exchanger.close()


def make_credentials(
    settings: Settings, presented: PresentedTokens | None, store: GrantStore | None
) -> dict[str, UpstreamCredential]:
    """One credential per upstream, by name. Raises `ConfigError` for a secret that cannot be read."""
    found: dict[str, UpstreamCredential] = {}
    for upstream in settings.upstreams:
        if upstream.credential == "token_exchange" and upstream.token_exchange is not None:
            assert presented is not None
            exchanger = TokenExchanger(upstream.name, upstream.token_exchange, upstream.url)
            found[upstream.name] = ExchangedCredential(upstream.name, exchanger, presented)
        elif upstream.credential == "brokered" and upstream.oauth is not None:
            assert store is not None
            found[upstream.name] = BrokeredCredential(
                upstream.name, upstream.oauth, upstream.url, store, settings.base_url
            )
        else:
            found[upstream.name] = GatewayCredential()
    return found


def grant_store(settings: Settings) -> GrantStore | None:
    """The brokered grants' store, when an upstream brokers per-user grants."""
    if not any(u.credential == "brokered" for u in settings.upstreams):
        return None
    path = settings.data_file(settings.credentials.path, "credentials.db")
    return GrantStore(path, Sealer.from_settings(settings))


class _HasCredential(Protocol):
    name: str
    credential: UpstreamCredential


def attach_credentials(connections: Sequence[_HasCredential], credentials: Mapping[str, UpstreamCredential]) -> None:
    for connection in connections:
        connection.credential = credentials[connection.name]
