"""On behalf of the user: Unity Catalog asked with the caller's own federated Databricks token, so the
workspace's grants for that caller decide (`grants.databricks_identity = "on_behalf_of_user"`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from server.auth.presented import PresentedTokens
from server.credentials.token_endpoint import STAGE
from server.errors import BackendUnavailable, ConfigError, Denied
from server.grants.databricks import effective_privileges, owner_of
from server.grants.databricks_federation import DatabricksTokenFederation
from server.grants.source import ACCOUNT_USERS, ALL_EXPANDS_TO, ALL_PRIVILEGES
from server.identity import Principal
from server.invoke import caller
from server.settings import Settings

T = TypeVar("T")

_bearer: ContextVar[str | None] = ContextVar("castellan_databricks_bearer", default=None)
"""The caller's Databricks token for the SDK requests made in this context (see `run_as`)."""


def caller_client(host: str, timeout: float) -> Any:
    """A `WorkspaceClient` whose every request carries the token `run_as` bound, and fails without one:
    it never holds, or falls back to, credentials of its own. Raises `ConfigError` without the SDK."""
    try:
        from databricks.sdk import WorkspaceClient
        from databricks.sdk.core import Config
        from databricks.sdk.credentials_provider import CredentialsProvider, CredentialsStrategy
    except ImportError:
        raise ConfigError("on-behalf-of-user mode needs the extra: pip install 'castellan[databricks]'") from None

    class CallerToken(CredentialsStrategy):
        def auth_type(self) -> str:
            return "castellan-on-behalf-of-user"

        def __call__(self, cfg: Config) -> CredentialsProvider:
            def headers() -> dict[str, str]:
                token = _bearer.get()
                if token is None:
                    raise PermissionError("no caller's Databricks token is bound to this request")
                return {"Authorization": f"Bearer {token}"}

            return headers

    config = Config(
        host=host,
        credentials_strategy=CallerToken(),
        retry_timeout_seconds=int(timeout),
        http_timeout_seconds=int(timeout),
    )
    return WorkspaceClient(config=config)


async def run_as(token: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread (the SDK is synchronous) with `token` as the caller's Databricks token."""

    def bound() -> T:
        _bearer.set(token)  # to_thread runs in a copy of this context: the binding ends with the call
        return fn(*args)

    return await asyncio.to_thread(bound)


@dataclass(frozen=True, slots=True)
class OnBehalf:
    """What a tool needs to call the workspace as its caller: the caller-token client and the federation."""

    client: Any
    federation: DatabricksTokenFederation

    async def token(self) -> str:
        """The current caller's Databricks token. Raises `Denied` / `BackendUnavailable` as the federation does."""
        return await self.federation.token_for(caller.get())

    async def close(self) -> None:
        """At gateway shutdown: the federation's pooled session (grants and tools share it, so it is
        closed once, here, not by either of them)."""
        await self.federation.close()

    def refused(self, token: str) -> Denied:
        """The workspace refused the current caller's `token` (revoked, expired early): it is not used
        again, and the call is denied."""
        self.federation.forget(caller.get(), token)
        return Denied(STAGE, "databricks on-behalf-of-user: the workspace refused the caller's Databricks token")


class _Refused(Exception):
    """The workspace answered 401 to a caller's token (raised in the worker thread, handled on the loop)."""


class DatabricksOnBehalfGrants:
    """Effective privileges as the workspace answers them for the caller itself: the caller's token
    is federated for a Databricks token (`DatabricksTokenFederation`), the workspace says who that is
    (`GET /api/2.0/preview/scim/v2/Me`: its user name and groups), and Unity Catalog is asked with that
    token for the effective permissions (`grants.get_effective`, inheritance included) of that
    principal, of each group the workspace puts it in, and of `account users`, and for the securable's
    owner (any of those: all privileges on it). The principals the gateway read from the token are
    not asked about: the workspace decides who the caller is and what it holds.

    A securable the caller may not see (404, 403) holds nothing. No caller, no token to federate, or
    a refused federation raise `Denied`; a workspace refusing the federated token `Denied` too; any
    other failure `BackendUnavailable`. Never asks with the gateway's own credentials."""

    identity = "on_behalf_of_user"

    def __init__(self, on_behalf: OnBehalf, timeout: float = 10.0, max_entries: int = 10_000) -> None:
        self._client = on_behalf.client
        self._on_behalf = on_behalf
        self._timeout = timeout
        self._max_entries = max_entries
        self._who: dict[str, tuple[str, frozenset[str]]] = {}
        self._who_lock = threading.Lock()

    async def privileges(self, principals: Sequence[Principal], securable_type: str, securable: str) -> frozenset[str]:
        token = await self._on_behalf.token()
        try:
            return await asyncio.wait_for(
                run_as(token, self._privileges, token, securable_type, securable), self._timeout
            )
        except _Refused:
            raise self._on_behalf.refused(token) from None
        except TimeoutError:
            raise BackendUnavailable("grants", f"grant source unavailable: no answer in {self._timeout:g}s") from None

    def _privileges(self, token: str, securable_type: str, securable: str) -> frozenset[str]:
        from databricks.sdk.errors.base import DatabricksError
        from databricks.sdk.errors.platform import NotFound, PermissionDenied, Unauthenticated

        try:
            name, groups = self._whoami(token)
            held: set[str] = set()
            who = [name, *sorted(groups - {ACCOUNT_USERS}), ACCOUNT_USERS]
            for principal in who:
                held |= effective_privileges(self._client, securable_type, securable, principal)
            if owner_of(self._client, securable_type, securable) in who:
                held.add(ALL_PRIVILEGES)
        except (NotFound, PermissionDenied):
            return frozenset()
        except Unauthenticated:
            raise _Refused from None
        except (DatabricksError, OSError, ValueError) as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {type(exc).__name__}: {exc}") from exc
        if ALL_PRIVILEGES in held:
            held |= ALL_EXPANDS_TO
            held.discard(ALL_PRIVILEGES)
        return frozenset(held)

    def _whoami(self, token: str) -> tuple[str, frozenset[str]]:
        """The workspace's name for the token's principal and its groups, once per federated token."""
        with self._who_lock:
            hit = self._who.get(token)
        if hit is not None:
            return hit
        me = self._client.current_user.me()
        if not me.user_name:
            raise ValueError("the workspace did not name the caller (SCIM Me has no userName)")
        who = (str(me.user_name), frozenset(str(g.display) for g in me.groups or [] if g.display))
        with self._who_lock:
            if len(self._who) >= self._max_entries:
                self._who.clear()
            self._who[token] = who
        return who

    async def check(self) -> None:
        """The workspace's token endpoint answers (no caller is at hand to ask Unity Catalog as)."""
        await reachable(self._on_behalf.federation.token_url, self._timeout, "grants")

    async def close(self) -> None:
        return None


def on_behalf_for(settings: Settings, presented: PresentedTokens) -> OnBehalf | None:
    """The one federation (and caller-token client) that grants and catalog functions share when either
    acts on behalf of the caller, so each caller is federated once; None when neither does."""
    if not acts_on_behalf(settings):
        return None
    grants = settings.grants
    if not grants.databricks_host:
        raise ConfigError("on-behalf-of-user mode needs grants.databricks_host (the workspace URL)")
    federation = DatabricksTokenFederation(
        grants.databricks_host,
        presented,
        scopes=tuple(grants.databricks_scopes),
        client_id=grants.databricks_client_id,
        timeout_seconds=grants.timeout_seconds,
    )
    return OnBehalf(caller_client(grants.databricks_host, grants.timeout_seconds), federation)


async def reachable(url: str, timeout_seconds: float, stage: str) -> None:
    """Raises `BackendUnavailable` unless `url` gives an HTTP answer below 500 (a GET of a token
    endpoint is refused, which shows it is there)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_seconds)) as session,
            session.get(url) as resp,
        ):
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BackendUnavailable(stage, f"databricks workspace unreachable at {url} ({type(exc).__name__})") from None
    if status >= 500:
        raise BackendUnavailable(stage, f"databricks workspace unavailable at {url} (HTTP {status})")


def acts_on_behalf(settings: Settings) -> bool:
    """Whether grants or catalog functions call the workspace as each caller (so its token is kept)."""
    grants = settings.grants.backend == "databricks" and settings.grants.databricks_identity == "on_behalf_of_user"
    return grants or bool(
        settings.tools.databricks_functions and settings.tools.databricks_identity == "on_behalf_of_user"
    )
