"""OAuth 2.0 Protected Resource Metadata (RFC 9728): where clients learn which issuer to ask for tokens."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def metadata_path(resource_url: str) -> str:
    """The well-known path for `resource_url` (RFC 9728 §3.1: the resource's path is appended)."""
    path = urlsplit(resource_url).path.rstrip("/")
    return f"/.well-known/oauth-protected-resource{path}"


def metadata_url(base_url: str, resource_url: str) -> str:
    return f"{base_url.rstrip('/')}{metadata_path(resource_url)}"


def protected_resource_metadata(
    resource_url: str, authorization_servers: list[str], scopes: list[str]
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "resource": resource_url,
        "authorization_servers": authorization_servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "Castellan MCP gateway",
    }
    if scopes:
        document["scopes_supported"] = scopes
    return document
