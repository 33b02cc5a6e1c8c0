"""Protected resource metadata (RFC 9728) names only authorization servers that exist."""

from __future__ import annotations

from typing import Any

from server.auth.metadata import authorization_servers, protected_resource_metadata
from server.settings import Settings


def _metadata(**auth: Any) -> dict[str, Any]:
    settings = Settings(auth=auth)
    return protected_resource_metadata(settings.resource_url, authorization_servers(settings), [])


def test_dev_mode_names_the_gateways_own_dev_issuer() -> None:
    settings = Settings()
    assert _metadata()["authorization_servers"] == [settings.base_url]


def test_without_the_dev_issuer_the_metadata_names_no_authorization_server() -> None:
    document = _metadata(dev_issuer=False)
    assert "authorization_servers" not in document
    assert document["resource"] == Settings().resource_url


def test_configured_authorization_servers_or_an_explicit_issuer_are_named() -> None:
    assert _metadata(dev_issuer=False, issuer="https://idp.example")["authorization_servers"] == ["https://idp.example"]
    named = _metadata(dev_issuer=False, authorization_servers=["https://as.example"])
    assert named["authorization_servers"] == ["https://as.example"]
    jwt = _metadata(mode="jwt", issuer="https://idp.example", jwks_url="https://idp.example/jwks")
    assert jwt["authorization_servers"] == ["https://idp.example"]
