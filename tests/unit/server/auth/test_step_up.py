"""Step-up: a call of a tool that needs a scope the token lacks is answered at the HTTP edge with 403
`insufficient_scope` naming the scopes (RFC 6750 §3.1, the MCP authorization spec), not a tool result;
the authenticate stage denies it too (a backstop for paths that skip the edge), and listing is not
affected (calling the tool is how a client learns to step up)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.auth.middleware import BearerAuthMiddleware
from server.auth.scopes import ToolScopes
from server.auth.stage import AuthenticateStage
from server.errors import Denied
from server.identity import Identity
from server.metrics import Metrics
from tests.fakes.backends import make_call, make_identity

pytestmark = pytest.mark.anyio

SCOPES = ToolScopes(["mcp:tools"], {"admin.*": ["castellan:admin"], "sql.query": ["castellan:sql"]})


def test_a_tool_needs_the_required_scopes_and_every_matching_entry() -> None:
    assert SCOPES.needed("admin.reset") == ("mcp:tools", "castellan:admin")
    assert SCOPES.needed("sql.query") == ("mcp:tools", "castellan:sql")
    assert SCOPES.needed("echo") == ("mcp:tools",)
    assert SCOPES.missing("admin.reset", ["mcp:tools"]) == ("castellan:admin",)
    assert SCOPES.supported() == ["mcp:tools", "castellan:sql", "castellan:admin"]


async def test_the_stage_denies_a_call_missing_the_tools_scope_but_lists_the_tool() -> None:
    stage = AuthenticateStage(scopes=SCOPES)
    identity = make_identity(scopes=("mcp:tools",))
    with pytest.raises(Denied, match="castellan:admin"):
        await stage.run(make_call(tool_name="admin.reset", identity=identity))
    await stage.run(make_call(tool_name="admin.reset", identity=identity, action="list"))


class _Verifier:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    async def verify(self, token: str) -> Identity:
        return self.identity


async def _post(scopes: tuple[str, ...], body: dict[str, Any]) -> tuple[int, dict[str, str], bytes, bytes]:
    """One POST through the middleware; returns status, headers, response body and what the app read."""
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = BearerAuthMiddleware(
        app,
        _Verifier(make_identity(scopes=scopes)),
        "http://gw/.well-known/oauth-protected-resource/mcp",
        Metrics(),
        scopes=SCOPES,
    )
    raw = json.dumps(body).encode()
    chunks = [raw[:10], raw[10:]]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": [(b"authorization", b"Bearer t")]}
    await middleware(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, sent[1]["body"], seen[0] if seen else b""


def _call(name: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {}}}


async def test_a_call_lacking_the_tools_scope_gets_403_naming_every_scope_it_needs() -> None:
    status, headers, body, _ = await _post(("mcp:tools",), _call("admin.reset"))
    assert status == 403
    challenge = headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="mcp:tools castellan:admin"' in challenge
    assert 'resource_metadata="http://gw/.well-known/oauth-protected-resource/mcp"' in challenge
    assert "castellan:admin" in json.loads(body)["error"]["message"]


async def test_a_call_holding_the_scope_reaches_the_transport_with_its_body_intact() -> None:
    status, _, _, seen = await _post(("mcp:tools", "castellan:admin"), _call("admin.reset"))
    assert status == 200
    assert json.loads(seen) == _call("admin.reset")


async def test_other_requests_are_not_held_to_tool_scopes() -> None:
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    assert (await _post(("mcp:tools",), listing))[0] == 200
    assert (await _post(("mcp:tools",), _call("echo")))[0] == 200
