from __future__ import annotations

import pytest

from server.transport import _matches, allowed_hosts, allowed_origins


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("127.0.0.1:8750", True),
        ("localhost:1", True),
        ("[::1]:8750", True),
        ("127.0.0.1", True),
        ("127.0.0.1.evil.com:80", False),
        ("evil.com", False),
        ("localhost:80abc", False),
        ("gateway.example.com", True),
        ("gateway.example.com:8443", False),
        ("", False),
    ],
)
def test_host_allow_list(value: str, ok: bool) -> None:
    hosts = allowed_hosts("https://gateway.example.com", [])
    assert _matches(value, hosts) is ok


def test_origins_allow_loopback_and_the_public_url_only() -> None:
    origins = allowed_origins("https://gateway.example.com", ["https://app.example.com"])
    assert _matches("http://localhost:3000", origins)
    assert _matches("https://gateway.example.com", origins)
    assert _matches("https://app.example.com", origins)
    assert not _matches("https://evil.example.com", origins)
    assert not _matches("null", origins)
