"""What a test client puts on the wire to talk MCP to the gateway app in either protocol era: the
versions, the 2026-era request envelope, the JSON headers, and the 2025-era session handshake."""

from __future__ import annotations

from starlette.testclient import TestClient

MODERN = "2026-07-28"
SESSION = "2025-11-25"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def open_session(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    """A 2025-era session, initialized and acknowledged; `headers` plus the session's id and version."""
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": SESSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    resp = client.post("/mcp", json=init, headers=headers)
    assert resp.status_code == 200, resp.text
    session = {**headers, "mcp-session-id": resp.headers["mcp-session-id"], "mcp-protocol-version": SESSION}
    ack = client.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
    assert ack.status_code == 202, ack.text
    return session
