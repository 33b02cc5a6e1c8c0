"""`castellan connect` keeps its credential fresh: a token file is re-read when it changes; the OAuth
store is private and remembers when the token expires and which server issued it."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx2
import pytest
from mcp.shared.auth import OAuthToken

from server.connect import FileBearer, FileTokenStorage

pytestmark = pytest.mark.anyio


def _sent(auth: httpx2.Auth) -> str:
    request = httpx2.Request("POST", "http://gw/mcp")
    return str(next(auth.auth_flow(request)).headers["Authorization"])


def test_a_token_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    auth = FileBearer(path)
    assert _sent(auth) == "Bearer first-token"
    path.write_text("second-token-renewed\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert _sent(auth) == "Bearer second-token-renewed"


async def test_the_token_store_is_private_and_knows_when_the_token_expires(tmp_path: Path) -> None:
    storage = FileTokenStorage(tmp_path / "sub" / "store.json")
    await storage.set_tokens(OAuthToken(access_token="a", refresh_token="r", expires_in=600))
    assert stat.S_IMODE(storage.path.stat().st_mode) == 0o600
    assert (await storage.get_tokens()).refresh_token == "r"  # type: ignore[union-attr]
    expires_at = storage.expires_at()
    assert expires_at is not None
    assert time.time() + 590 < expires_at <= time.time() + 600
