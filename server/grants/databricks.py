"""Unity Catalog in a Databricks workspace as the grant source, through `databricks-sdk`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from server.errors import BackendUnavailable, ConfigError
from server.grants.source import ACCOUNT_USERS, ALL_EXPANDS_TO, ALL_PRIVILEGES, normalize_privilege
from server.identity import Principal, PrincipalKind

# How Unity Catalog names each kind of principal in grants, and the SCIM resource that holds it:
# users by `userName` (their email), service principals by `applicationId`, groups by `displayName`.
_SCIM: dict[PrincipalKind, tuple[str, str, str]] = {
    "user": ("users", "userName", "user_name"),
    "service_principal": ("service_principals", "applicationId", "application_id"),
    "group": ("groups", "displayName", "display_name"),
}


class DatabricksGrants:
    """Effective privileges from `GET /api/2.1/unity-catalog/effective-permissions/{type}/{name}`
    (`WorkspaceClient.grants.get_effective`), asked for each of the caller's principals (agent,
    subject, each group its token names, and `account users`) and united. Privileges inherited from
    parent securables come from Unity Catalog itself; ownership (all privileges on the owned object)
    from the securable's own endpoint (`functions.get`, `tables.get`, ...).

    Unity Catalog's grant APIs name a principal by a bare string, whatever its kind, so asking for
    `principal=admins` answers for the group `admins`. Each typed principal is therefore first
    confirmed to exist with its kind, through the workspace's SCIM API (`users.list`,
    `service_principals.list`, `groups.list` with an `eq` filter on the attribute Unity Catalog
    names it by; the answer compared exactly, user names (emails) without regard to case, or, when
    the workspace shows non-admins entries without that attribute, a single entry as the filter's
    answer); an unconfirmed principal is not asked about and holds nothing. Confirmations are
    cached for `kind_ttl` seconds.

    The SDK is synchronous, so calls run in a thread; the grants cache keeps them off the hot path.
    An unknown securable holds nothing. Any other API error (403 for the gateway's own credentials,
    5xx, network) raises `BackendUnavailable`: the call is denied.
    """

    def __init__(self, client: Any, timeout: float = 10.0, kind_ttl: float = 300.0) -> None:
        self._client = client
        self._timeout = timeout
        self._kind_ttl = kind_ttl
        self._kinds: dict[Principal, tuple[float, bool]] = {}
        self._kinds_lock = threading.Lock()

    @classmethod
    def from_settings(cls, host: str, profile: str, timeout: float = 10.0) -> DatabricksGrants:
        """The SDK's usual auth (env vars, profile, OAuth), with retries bounded: by default it retries
        a 503 for five minutes, which would hold every call that long."""
        try:
            from databricks.sdk import WorkspaceClient
            from databricks.sdk.core import Config
        except ImportError:
            raise ConfigError(
                "grants.backend = 'databricks' needs the extra: pip install 'castellan[databricks]'"
            ) from None
        try:
            config = Config(
                host=host or None,
                profile=profile or None,
                retry_timeout_seconds=int(timeout),
                http_timeout_seconds=int(timeout),
            )
            return cls(WorkspaceClient(config=config), timeout)
        except Exception as exc:  # the SDK raises ValueError for missing or conflicting auth
            raise ConfigError(f"cannot configure the Databricks SDK: {exc}") from None

    async def privileges(self, principals: Sequence[Principal], securable_type: str, securable: str) -> frozenset[str]:
        lookup = asyncio.to_thread(self._privileges, tuple(principals), securable_type, securable)
        try:
            return await asyncio.wait_for(lookup, self._timeout)
        except TimeoutError:
            raise BackendUnavailable("grants", f"grant source unavailable: no answer in {self._timeout:g}s") from None

    def _privileges(self, principals: tuple[Principal, ...], securable_type: str, securable: str) -> frozenset[str]:
        from databricks.sdk.errors.base import DatabricksError
        from databricks.sdk.errors.platform import NotFound

        held: set[str] = set()
        try:
            confirmed = [p.name for p in dict.fromkeys(principals) if p.name != ACCOUNT_USERS and self._exists(p)]
            who = list(dict.fromkeys([*confirmed, ACCOUNT_USERS]))
            for principal in who:
                held |= effective_privileges(self._client, securable_type, securable, principal)
            if owner_of(self._client, securable_type, securable) in who:
                held.add(ALL_PRIVILEGES)
        except NotFound:
            return frozenset()
        except (DatabricksError, OSError, ValueError) as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {type(exc).__name__}: {exc}") from exc
        if ALL_PRIVILEGES in held:
            held |= ALL_EXPANDS_TO
            held.discard(ALL_PRIVILEGES)
        return frozenset(held)

    def _exists(self, principal: Principal) -> bool:
        """The workspace has a principal of this kind with exactly this name (cached `kind_ttl` s)."""
        now = time.monotonic()
        with self._kinds_lock:
            hit = self._kinds.get(principal)
        if hit is not None and now - hit[0] < self._kind_ttl:
            return hit[1]
        api_name, attribute, field = _SCIM[principal.kind]
        api = getattr(self._client, api_name)
        # RFC 7644 §3.4.2.2: the value is a JSON string, so quotes and backslashes in a name stay inside it.
        found = list(
            api.list(filter=f"{attribute} eq {json.dumps(principal.name)}", attributes=f"id,{attribute}", count=10)
        )
        named = [getattr(item, field, None) for item in found]
        wanted = principal.name.casefold() if principal.kind == "user" else principal.name
        exists = any(n is not None and (n.casefold() if principal.kind == "user" else n) == wanted for n in named)
        # Non-admin credentials may see entries without the attribute: then only one entry, the filter's
        # whole answer, confirms (a filter the server ignored would list everyone).
        exists = exists or (len(found) == 1 and named == [None])
        with self._kinds_lock:
            if len(self._kinds) > 50_000:
                self._kinds.clear()
            self._kinds[principal] = (now, exists)
        return exists

    async def check(self) -> None:
        def probe() -> None:
            list(self._client.catalogs.list(max_results=1))

        try:
            await asyncio.to_thread(probe)
        except Exception as exc:
            raise BackendUnavailable("grants", f"grant source unavailable: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        return None


def effective_privileges(client: Any, securable_type: str, securable: str, principal: str) -> set[str]:
    """What Unity Catalog says `principal` holds on the securable (`grants.get_effective`, every page)."""
    held: set[str] = set()
    page_token: str | None = None
    # Unity Catalog has no MCP resources: a resource is governed as the volume of that name, and
    # READ on it is READ VOLUME (docs/protocol.md).
    uc_type = "volume" if securable_type == "RESOURCE" else securable_type.lower()
    while True:
        page = client.grants.get_effective(
            uc_type, securable, principal=principal, max_results=0, page_token=page_token
        )
        for assignment in page.privilege_assignments or []:
            if assignment.principal != principal:
                continue
            for privilege in assignment.privileges or []:
                if privilege.privilege is not None:
                    name = normalize_privilege(privilege.privilege.value)
                    held.add("READ" if uc_type == "volume" and name == "READ VOLUME" else name)
        page_token = page.next_page_token
        if not page_token:
            return held


def owner_of(client: Any, securable_type: str, securable: str) -> str | None:
    """The securable's owner, from its own endpoint (`functions.get`, `tables.get`, ...); None if unknown."""
    from databricks.sdk.errors.platform import NotFound

    api = {
        "CATALOG": client.catalogs,
        "SCHEMA": client.schemas,
        "FUNCTION": client.functions,
        "TABLE": client.tables,
        "RESOURCE": client.volumes,
    }[securable_type]
    try:
        info = api.read(securable) if securable_type == "RESOURCE" else api.get(securable)
    except NotFound:
        return None
    owner = getattr(info, "owner", None)
    return owner if isinstance(owner, str) and owner else None
