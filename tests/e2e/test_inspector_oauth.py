"""The MCP Inspector CLI signs in to the demo gateway with OAuth at its dev issuer (no --header token):
discovery, dynamic registration, code + PKCE through its own loopback callback listener."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NODE
from tests.e2e.test_inspector_cli import INSPECTOR
from tests.gateway_process import ANALYST_TOOLS, GatewayProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _sign_in(url: str, identity: str) -> str:
    """A person at the dev sign-in page: open it, pick `identity`, allow. Returns the redirect."""
    with urllib.request.urlopen(url, timeout=30) as page:
        assert page.status == 200
        assert "Development only" in page.read().decode()
    query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)
    form = [*query, ("identity", identity), ("decision", "allow")]
    form += [("grant_scope", s) for k, v in query if k == "scope" for s in v.split()]
    action = url.split("?", 1)[0]
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:  # urllib reports an unfollowed 302 as an error
        opener.open(urllib.request.Request(action, data=urllib.parse.urlencode(form).encode()), timeout=30)
    assert redirect.value.code == 302
    return str(redirect.value.headers["Location"])


def test_the_inspector_cli_signs_in_with_oauth_and_lists_tools(
    node: Path, tmp_path: Path, gateway: GatewayProcess
) -> None:
    callback = f"http://127.0.0.1:{free_port()}/oauth/callback"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PATH": f"{NODE.parent}:{os.environ.get('PATH', '')}",
        "CI": "true",
        "BROWSER": "true",  # no real browser: the test is the person at the sign-in page
        "MCP_AUTO_OPEN_ENABLED": "true",
        "MCP_INSPECTOR_SECRET_STORE": "memory",
    }
    args = [str(node), str(INSPECTOR), "--cli", gateway.mcp_url, "--method", "tools/list", "--callback-url", callback]
    out_file = tmp_path / "inspector.out"
    with out_file.open("w") as out:
        process = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, text=True
        )
    redirects: list[str] = []
    stderr: list[str] = []

    def person() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr.append(line)
            found = re.search(r"navigate to: (\S+)", line)
            if found and not redirects:
                redirects.append(_sign_in(found.group(1), "alice"))
                with urllib.request.urlopen(redirects[0], timeout=30) as done:  # the Inspector's listener
                    assert done.status == 200

    reader = threading.Thread(target=person, daemon=True)
    reader.start()
    try:
        process.wait(timeout=180)
    finally:
        process.kill()
    reader.join(timeout=10)
    assert process.returncode == 0, "".join(stderr)
    assert redirects, "".join(stderr)
    assert redirects[0].startswith(callback)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(redirects[0]).query)["iss"] == [gateway.base_url]
    listed: Any = json.loads(out_file.read_text())
    assert sorted(t["name"] for t in listed["tools"]) == ANALYST_TOOLS
