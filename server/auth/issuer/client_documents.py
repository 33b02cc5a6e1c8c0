"""Client ID metadata documents: a client whose `client_id` is an HTTPS URL is described by the JSON there.

The MCP authorization spec (2025-11-25) prefers them to dynamic registration: the client hosts its
metadata, and any authorization server resolves it, with nothing registered ahead. The issuer fetches
the document when it first meets the URL (before authlib looks the client up), checks it as RFC 7591
client metadata (authlib's claims), and caches it for `ttl` seconds.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from authlib.oauth2.rfc7591 import ClientMetadataClaims
from joserfc.errors import JoseError

from server.auth.issuer.store import IssuerClient
from server.auth.strict_json import loads_strict

log = structlog.get_logger("castellan.issuer")

MAX_DOCUMENT_BYTES = 16_384


def client_claims(document: dict[str, Any], server_metadata: dict[str, Any]) -> ClientMetadataClaims:
    """RFC 7591 client metadata checked against what the issuer supports (any scope may be registered:
    which ones are granted is the sign-in page's decision)."""
    supported = {k: v for k, v in server_metadata.items() if k != "scopes_supported"}
    return ClientMetadataClaims(document, {}, ClientMetadataClaims.get_claims_options(supported), supported)


class ClientDocumentError(Exception):
    """The URL is not a usable client ID metadata document (the reason says why)."""


def is_document_url(client_id: str) -> bool:
    """Whether `client_id` names a metadata document: an https URL with a path (the spec's shape)."""
    parts = urlsplit(client_id)
    return parts.scheme == "https" and bool(parts.hostname) and parts.path not in ("", "/")


class ClientDocuments:
    """Fetches and caches client ID metadata documents. `server_metadata`: the issuer's RFC 8414
    metadata, which the document's grant types, response types and auth method must fit."""

    def __init__(self, server_metadata: dict[str, Any], *, ttl: float = 300.0, timeout: float = 5.0) -> None:
        self._metadata = server_metadata
        self._ttl = ttl
        self._timeout = timeout
        self._cache: dict[str, tuple[float, IssuerClient]] = {}

    def cached(self, client_id: str) -> IssuerClient | None:
        hit = self._cache.get(client_id)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    async def resolve(self, client_id: str) -> IssuerClient:
        """The client the document at `client_id` describes. Raises `ClientDocumentError`."""
        hit = self.cached(client_id)
        if hit is not None:
            return hit
        if not is_document_url(client_id) or urlsplit(client_id).fragment or "@" in urlsplit(client_id).netloc:
            raise ClientDocumentError("a client ID metadata document URL is https, with a path, no fragment")
        document = await self._fetch(client_id)
        client = self._validated(client_id, document)
        self._cache[client_id] = (time.monotonic() + self._ttl, client)
        log.info("client_document_resolved", client_id=client_id, client_name=client.name)
        return client

    async def _fetch(self, url: str) -> dict[str, Any]:
        try:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as resp,
            ):
                if resp.status != 200:
                    raise ClientDocumentError(f"{url} answered HTTP {resp.status}")
                body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientDocumentError(f"cannot fetch {url}: {exc}") from None
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ClientDocumentError(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = loads_strict(body)
        except ValueError as exc:
            raise ClientDocumentError(f"{url} is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ClientDocumentError(f"{url} is not a JSON object")
        return document

    def _validated(self, url: str, document: dict[str, Any]) -> IssuerClient:
        if document.get("client_id") != url:
            raise ClientDocumentError("the document's client_id is not the URL it was fetched from")
        if "client_secret" in document or "client_secret_expires_at" in document:
            raise ClientDocumentError("a client ID metadata document must not carry a client secret")
        method = document.get("token_endpoint_auth_method", "none")
        if method != "none":
            raise ClientDocumentError(f"token_endpoint_auth_method {method!r}: only public clients (none) here")
        if not document.get("redirect_uris"):
            raise ClientDocumentError("the document names no redirect_uris")
        claims = client_claims({k: v for k, v in document.items() if k != "client_id"}, self._metadata)
        try:
            claims.validate()
        except JoseError as exc:
            raise ClientDocumentError(f"invalid client metadata: {exc.description}") from None
        return IssuerClient.from_document(
            {**claims.get_registered_claims(), "client_id": url, "token_endpoint_auth_method": "none"},
            from_metadata_document=True,
        )
