"""HTTP-edge refusals in the format of the API the path belongs to: Anthropic's under ``/v1/messages``.

The edge answers before the pipeline (parser errors, oversize lines, slow clients); it chooses the format
by path with the pipeline's own function, reading the path from the request line when the parser failed.
Raw sockets, as in test_edge.py; the statuses and rules are the edge's, only the body's shape changes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from llm_warden.proxy.edge import edge_error_body, target_path
from llm_warden.proxy.errors import WardenError
from tests.proxy.test_edge import (
    MARK,
    TOKEN,
    Edge,
    EdgeFactory,
    _read_all,
    _slow_body,
    _trickle,
    assert_no_echo,
    edge,
    edge_factory,
    parse_answer,
    send_raw,
)

__all__ = ["edge", "edge_factory"]  # test_edge.py's fixtures: both listeners of a real Warden


def _line_then_nothing(port: int, data: bytes, limit_s: float) -> tuple[bytes, bool]:
    """Send the request line and part of the headers, then wait for the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(data)
        return _read_all(sock, limit_s)


def anthropic_refusal(raw: bytes, closed: bool, status: int, rule: str) -> dict[str, Any]:
    answer = parse_answer(raw, closed)
    assert answer.status == status, answer.raw[:400]
    assert answer.headers["content-type"].startswith("application/json") and answer.headers.get("connection", "").lower() == "close"
    doc = orjson.loads(answer.body)
    assert set(doc) == {"type", "error", "request_id"} and doc["type"] == "error", doc
    assert set(doc["error"]) == {"type", "message"} and doc["error"]["message"].endswith(f"(rule: {rule})")
    assert answer.closed
    return dict(doc["error"])


MESSAGES: dict[str, tuple[bytes, int, str, str]] = {
    "header_line_100kb": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + TOKEN + b"A" * 100_000 + b"\r\n\r\n", 431, "server.max_header_bytes", "invalid_request_error"),
    "url_10kb": (b"POST /v1/messages?q=" + MARK * 800 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "server.max_url_bytes", "invalid_request_error"),
    "long_path_below_messages": (b"GET /v1/messages/batches/" + MARK * 800 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "server.max_url_bytes", "invalid_request_error"),
    "content_length_and_chunked": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX-T: " + MARK + b"\r\n\r\n0\r\n\r\n", 400, "http.framing", "invalid_request_error"),
    "too_many_headers": (b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, MARK) for i in range(150)) + b"\r\n", 431, "server.max_headers", "invalid_request_error"),
    "unknown_method": (b"FOO /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 501, "http.method", "api_error"),
    "nul_in_header_value": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + TOKEN + b"\x00" + MARK + b"\r\n\r\n", 400, "http.header", "invalid_request_error"),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
async def test_parser_errors_on_the_messages_api_are_anthropic_errors(edge: Edge, case: str) -> None:
    data, status, rule, kind = MESSAGES[case]
    answer = await send_raw(edge.port("data"), data)
    err = anthropic_refusal(answer.raw, answer.closed, status, rule)
    assert err["type"] == kind
    assert_no_echo(answer, data)


async def test_the_same_errors_elsewhere_stay_openai_errors(edge: Edge) -> None:
    for path in (b"/v1/chat/completions", b"/v1/messagesX", b"/v1/message"):
        data = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        answer = await send_raw(edge.port("data"), data)
        assert answer.status == 400 and answer.error()["message"].endswith("(rule: http.framing)")


async def test_slow_headers_on_the_messages_api_get_an_anthropic_408(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"header_timeout_s": 0.6})
    slow = b"x-api-key: " + TOKEN + b"\r\n\r\n"
    raw, closed = await asyncio.to_thread(_line_then_nothing, e.port("data"), b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + slow[:5], 5.0)
    err = anthropic_refusal(raw, closed, 408, "server.header_timeout_s")
    assert err["type"] == "invalid_request_error" and MARK.decode() not in err["message"]
    # A request line still arriving when the deadline passes has no path yet: OpenAI's format.
    raw, closed, _ = await asyncio.to_thread(_trickle, e.port("data"), b"POST /v1/messages HTTP/1.1\r\n", 0.1, 5.0)
    assert parse_answer(raw, closed).error()["message"].endswith("(rule: server.header_timeout_s)")


async def test_a_slow_body_on_the_messages_api_gets_an_anthropic_408(edge_factory: EdgeFactory, token: Callable[..., str]) -> None:
    e = await edge_factory({"body_timeout_s": 0.6})
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + token().encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    raw, closed, _ = await asyncio.to_thread(_slow_body, e.port("data"), head, b'{"model":"' + MARK, 5.0)
    anthropic_refusal(raw, closed, 408, "server.body_timeout_s")


def test_the_path_is_read_from_the_request_line_only_when_it_is_whole() -> None:
    assert target_path(b"POST /v1/messages HTTP/1.1\r\n") == "/v1/messages"
    assert target_path(b"POST /v1/messages?x=1 HTTP/1.1") == "/v1/messages"
    assert target_path(b"POST /v1/messages") is None, "the line may go on (/v1/messagesX...)"
    head = (b"GET /v1/messages/batches/" + b"a" * 64)[:64]
    assert target_path(head) == head[4:].decode(), "a path cut by the head's bound is its prefix"
    assert target_path(b"\x16\x03\x01 /v1/messages HTTP/1.1") is None
    assert target_path(b"POST /v1/mess\x00ages HTTP/1.1") is None
    err = WardenError("too slow", status=408, rule="server.header_timeout_s")
    assert orjson.loads(edge_error_body(err, None))["error"]["type"] == "invalid_request_error"
    assert orjson.loads(edge_error_body(err, "/v1/messages"))["type"] == "error"
