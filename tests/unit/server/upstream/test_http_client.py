"""The lean upstream client reads both answer forms and turns what is not a result into an error."""

from __future__ import annotations

import json

import pytest
from mcp.shared.exceptions import MCPError

from server.upstream.http_client import UpstreamProtocolError, param_headers, parse_response, result_of

RESULT = {"content": [{"type": "text", "text": "hi"}], "structuredContent": {"text": "hi"}, "isError": False}


def test_a_json_answer_is_read() -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 3, "result": RESULT}).encode()
    assert result_of(parse_response("application/json", body, 3)).structured_content == {"text": "hi"}


def test_an_event_stream_answer_skips_notifications_and_finds_the_response() -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    answer = {"jsonrpc": "2.0", "id": 9, "result": RESULT}
    body = f"event: message\r\ndata: {json.dumps(progress)}\r\n\r\nevent: message\r\ndata: {json.dumps(answer)}\r\n\r\n"
    result = result_of(parse_response("text/event-stream", body.encode(), 9))
    assert result.content == RESULT["content"]
    assert result.is_error is False


def test_an_answer_to_another_request_is_refused() -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 4, "result": RESULT}).encode()
    with pytest.raises(UpstreamProtocolError):
        parse_response("application/json", body, 3)


def test_an_error_answer_raises_the_upstreams_error() -> None:
    with pytest.raises(MCPError) as raised:
        result_of({"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "Unknown tool: x"}})
    assert raised.value.error.code == -32602
    assert "Unknown tool" in raised.value.error.message


def test_a_result_that_asks_for_input_is_not_taken_for_a_result() -> None:
    with pytest.raises(UpstreamProtocolError, match="input_required"):
        result_of({"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "inputRequests": {}}})


def test_mcp_param_headers_mirror_the_annotated_arguments() -> None:
    schema = {"type": "object", "properties": {"region": {"type": "string", "x-mcp-header": "Region"}}}
    assert param_headers(schema, {"region": "eu-west"}) == {"Mcp-Param-Region": "eu-west"}
    assert param_headers(schema, {}) == {}
    refused = {"type": "object", "properties": {"n": {"type": "number", "x-mcp-header": "N"}}}
    assert param_headers(refused, {"n": 1.5}) == {}  # a schema the spec refuses gets no headers
