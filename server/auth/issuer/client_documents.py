"""Client ID metadata documents: a client whose `client_id` is an HTTPS URL is described by the JSON there.

The MCP authorization spec (2025-11-25) prefers them to dynamic registration: the client hosts its
metadata, and any authorization server resolves it, with nothing registered ahead. The issuer fetches
the document when it first meets the URL (before authlib looks the client up), checks it as RFC 7591
client metadata (authlib's claims), and caches it for `ttl` seconds.

Fetching a URL any client names is a server-side request forgery surface, bounded here: https only, no
redirects, 16 KB, `timeout` seconds; the host is resolved once, every address must be public (not
loopback, private, link-local, shared, multicast or reserved, IPv4-mapped forms included) unless
`allow_private` (`auth.dev_issuer_private_documents`, for tests that host documents on 127.0.0.1), and
the connection goes to the address checked (a pinned resolver), so a second DNS answer cannot rebind it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
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

    def __init__(
        self,
        server_metadata: dict[str, Any],
        *,
        ttl: float = 300.0,
        timeout: float = 5.0,
        allow_private: bool = False,
    ) -> None:
        self._metadata = server_metadata
        self._ttl = ttl
        self._timeout = timeout
        self._allow_private = allow_private
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
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            addresses = await asyncio.wait_for(resolve_public(host, port, self._allow_private), self._timeout)
        except TimeoutError:
            raise ClientDocumentError(f"cannot resolve {host}: timed out") from None
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(host, addresses), use_dns_cache=False)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
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


async def resolve_public(host: str, port: int, allow_private: bool) -> list[ResolveResult]:
    """`host`'s addresses, resolved once. Raises `ClientDocumentError` when it does not resolve, or when
    any address is not public and `allow_private` is off (one private answer is enough to refuse: a
    name that mixes them is not a client's public document host)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError) as exc:
        raise ClientDocumentError(f"cannot resolve {host}: {exc}") from None
    results: list[ResolveResult] = []
    for family, _, proto, _, sockaddr in infos:
        address = str(sockaddr[0])
        if not allow_private and not is_public_address(address):
            raise ClientDocumentError(
                f"{host} resolves to {address}, which is not a public address "
                "(loopback, private and link-local document hosts need auth.dev_issuer_private_documents)"
            )
        results.append(
            ResolveResult(
                hostname=host, host=address, port=port, family=family, proto=proto, flags=socket.AI_NUMERICHOST
            )
        )
    if not results:
        raise ClientDocumentError(f"cannot resolve {host}: no addresses")
    return results


def is_public_address(address: str) -> bool:
    """Whether `address` is a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class PinnedResolver(AbstractResolver):
    """Answers for one host with the addresses already checked, and refuses any other host: the
    connection goes where the check looked (no second DNS lookup to rebind)."""

    def __init__(self, host: str, addresses: list[ResolveResult]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"{host} was not resolved and checked")
        wanted = [a for a in self._addresses if family in (socket.AF_UNSPEC, a["family"])]
        return wanted or self._addresses

    async def close(self) -> None:
        return None
