"""OAuth 2.0 Protected Resource Metadata (RFC 9728): where clients learn which issuer to ask for tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from server.settings import Settings


def metadata_path(resource_url: str) -> str:
    """The well-known path for `resource_url` (RFC 9728 §3.1: the resource's path is appended)."""
    path = urlsplit(resource_url).path.rstrip("/")
    return f"/.well-known/oauth-protected-resource{path}"


def metadata_url(base_url: str, resource_url: str) -> str:
    return f"{base_url.rstrip('/')}{metadata_path(resource_url)}"


def authorization_servers(settings: Settings) -> list[str]:
    """The authorization servers that really issue this gateway's tokens: `auth.authorization_servers`,
    else the trusted issuer. In dev mode with `auth.dev_issuer = false` and no `auth.issuer`, none:
    nothing answers OAuth at the gateway's base URL then (tokens come from `castellan token`), so the
    metadata must not name it; an OAuth client then stops at discovery instead of failing further on."""
    if settings.auth.authorization_servers:
        return list(settings.auth.authorization_servers)
    no_issuer_here = settings.auth.mode == "dev" and not settings.auth.dev_issuer and not settings.auth.issuer
    return [] if no_issuer_here or not settings.issuer else [settings.issuer]


def protected_resource_metadata(
    resource_url: str, authorization_servers: list[str], scopes: list[str]
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "resource": resource_url,
        "bearer_methods_supported": ["header"],
        "resource_name": "Castellan MCP gateway",
    }
    if authorization_servers:  # optional in RFC 9728 §2; absent rather than naming a server that is not there
        document["authorization_servers"] = authorization_servers
    if scopes:
        document["scopes_supported"] = scopes
    return document
