"""What the OAuth sign-in tests share: the official SDK client's token storage kept in memory, a token's
claims read without verifying it (the gateway verifies; the test only looks), and a tool call's text."""

from __future__ import annotations

import base64
import json
from typing import Any

from mcp.client.auth import TokenStorage
from mcp.client.client import Client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken


class MemoryStorage(TokenStorage):
    """The SDK's `TokenStorage` in memory; `history` keeps every token set stored, oldest first."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None
        self.history: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def tool_text(client: Client, name: str) -> str:
    """The text of a successful call of `name` (`echo` gets `{"text": "hello"}`, anything else `{}`)."""
    result = await client.call_tool(name, {"text": "hello"} if name == "echo" else {})
    assert not result.is_error, result
    return " ".join(getattr(block, "text", "") for block in result.content)
