"""`castellan connect URL`: a stdio MCP server that forwards every message to the gateway over
streamable HTTP with the agent's bearer token, for desktop agents that only speak stdio.

The bridge keeps its credential fresh itself: with `--sign-in` it is an OAuth client (the SDK's OAuth
client provider: discovery, registration, code + PKCE through the browser once, then refresh by itself,
tokens kept in a 0600 file); with `--token-file` it re-reads the file whenever it changes, so whatever
renews the file (a credential helper, a cron job) renews the bridge's token without a restart.

It bridges at the transport level (the `mcp` SDK's stdio server transport on one side, its
streamable HTTP client transport on the other), so both protocol eras, sessions and server-sent
events pass through; it adds the token, and for 2026-era requests the HTTP headers that era puts
beside the body (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`), read from the request itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthMetadata,
    OAuthToken,
)
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp_types import PROTOCOL_VERSION_META_KEY
from pydantic import AnyUrl


def with_http_headers(message: SessionMessage) -> SessionMessage:
    """A 2026-era request (its `_meta` names the protocol version) gets its per-request HTTP headers."""
    body: Any = message.message
    method = getattr(body, "method", None)
    params = getattr(body, "params", None) or {}
    version = (params.get("_meta") or {}).get(PROTOCOL_VERSION_META_KEY) if isinstance(params, dict) else None
    if not method or not isinstance(version, str):
        return message
    headers = {MCP_PROTOCOL_VERSION_HEADER: version, MCP_METHOD_HEADER: method}
    name_key = NAME_BEARING_METHODS.get(method)
    if name_key is not None and isinstance(name := params.get(name_key), str):
        headers[MCP_NAME_HEADER] = encode_header_value(name)
    return SessionMessage(body, metadata=ClientMessageMetadata(headers=headers))


class FileBearer(httpx2.Auth):
    """`Authorization: Bearer <the file's content>`, re-read whenever the file changes (by mtime and size)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._seen: tuple[float, int] | None = None
        self._token = ""

    def token(self) -> str:
        stat = self._path.stat()
        if (stat.st_mtime, stat.st_size) != self._seen:
            self._token, self._seen = self._path.read_text().strip(), (stat.st_mtime, stat.st_size)
        return self._token

    def auth_flow(self, request: httpx2.Request) -> Any:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request


class FileTokenStorage:
    """The SDK's `TokenStorage` in one JSON file (mode 0600): tokens, when they expire, the registration."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.context: Any = None
        """The provider's context: the authorization server it found is kept with the tokens, so a later
        run refreshes at that server's token endpoint without discovering it first."""

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, **members: Any) -> None:
        data = {**self._read(), **members}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, self.path)

    def expires_at(self) -> float | None:
        value = self._read().get("expires_at")
        return float(value) if isinstance(value, int | float) else None

    async def get_tokens(self) -> OAuthToken | None:
        tokens = self._read().get("tokens")
        return OAuthToken.model_validate(tokens) if tokens else None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        expires_at = time.time() + tokens.expires_in if tokens.expires_in else None
        server: dict[str, Any] = {}
        if self.context is not None and self.context.oauth_metadata is not None:
            server = {
                "authorization_server": self.context.auth_server_url,
                "metadata": self.context.oauth_metadata.model_dump(mode="json", exclude_none=True),
            }
        self._write(tokens=tokens.model_dump(mode="json", exclude_none=True), expires_at=expires_at, **server)

    def authorization_server(self) -> tuple[str | None, OAuthMetadata | None]:
        data = self._read()
        metadata = data.get("metadata")
        return data.get("authorization_server"), OAuthMetadata.model_validate(metadata) if metadata else None

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        client = self._read().get("client")
        return OAuthClientInformationFull.model_validate(client) if client else None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self._write(client=client_info.model_dump(mode="json", exclude_none=True))


class StoredSessionOAuth(OAuthClientProvider):
    """The SDK's OAuth client provider, told when the stored token expires and which authorization server
    issued it: a bridge started after its token expired refreshes it there first, instead of taking a
    401 for a full sign-in."""

    def __init__(self, storage: FileTokenStorage, **kwargs: Any) -> None:
        super().__init__(storage=storage, **kwargs)
        self._file = storage
        storage.context = self.context

    async def _initialize(self) -> None:
        await super()._initialize()
        self.context.token_expiry_time = self._file.expires_at()
        server, metadata = self._file.authorization_server()
        if metadata is not None and self.context.oauth_metadata is None:
            self.context.auth_server_url, self.context.oauth_metadata = server, metadata


def sign_in_auth(url: str, store: Path, callback_port: int) -> StoredSessionOAuth:
    """OAuth for the bridge: the first sign-in opens the browser (the URL is also printed on stderr) and
    waits for the redirect on a loopback port; later runs use and refresh the stored tokens."""
    redirect_uri = f"http://127.0.0.1:{callback_port}/callback"
    received: dict[str, str] = {}
    listening: list[Any] = []

    async def redirect_handler(authorization_url: str) -> None:
        # Listen before the URL is shown: a fast browser (or a person) may come back at once.
        listening.append(await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=callback_port))
        print(f"castellan connect: sign in at {authorization_url}", file=sys.stderr, flush=True)
        webbrowser.open(authorization_url)

    async def callback_handler() -> AuthorizationCodeResult:
        await _wait_for_redirect(listening.pop(), received)
        return AuthorizationCodeResult(
            code=received.get("code", ""), state=received.get("state"), iss=received.get("iss")
        )

    return StoredSessionOAuth(
        FileTokenStorage(store),
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="castellan connect",
            redirect_uris=[AnyUrl(redirect_uri)],
            grant_types=["authorization_code", "refresh_token"],
            token_endpoint_auth_method="none",
        ),
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )


async def _wait_for_redirect(listener: Any, received: dict[str, str]) -> None:
    """Serve one `GET /callback?code=...` on the loopback listener, then stop (at most 5 minutes)."""
    done = anyio.Event()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = (await stream.receive(65536)).decode("latin-1")
            target = head.split(" ", 2)[1] if head.count(" ") >= 2 else ""
            query = parse_qs(urlsplit(target).query)
            if "code" in query or "error" in query:
                received.update({k: v[0] for k, v in query.items()})
                done.set()
            body = b"Signed in: you can close this tab." if "code" in query else b"Sign-in did not complete."
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + body)

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        with anyio.fail_after(300):
            await done.wait()
        tasks.cancel_scope.cancel()


async def bridge(url: str, auth: httpx2.Auth | str) -> None:
    """`auth`: a bearer token, or an httpx auth that keeps one fresh (`FileBearer`, `sign_in_auth`)."""
    if isinstance(auth, str):
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {auth}"})
    else:
        http = create_mcp_http_client(auth=auth)
    async with (
        http,
        streamable_http_client(url, http_client=http) as (from_gateway, to_gateway, *_),
        stdio_server() as (from_client, to_client),
        anyio.create_task_group() as tasks,
    ):

        async def upstream() -> None:
            async for message in from_client:
                if not isinstance(message, Exception):  # an unparsable line: the SDK already answered it
                    await to_gateway.send(with_http_headers(message))
            tasks.cancel_scope.cancel()  # the desktop client went away: the session is over

        async def downstream() -> None:
            async for message in from_gateway:
                if not isinstance(message, Exception):
                    await to_client.send(message)
            tasks.cancel_scope.cancel()

        tasks.start_soon(upstream)
        tasks.start_soon(downstream)
