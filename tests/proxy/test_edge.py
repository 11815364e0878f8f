"""The HTTP edge of both listeners, against real listening sockets.

Raw sockets throughout: an HTTP client would normalise (or refuse to send)
the inputs that matter here.  Every refusal must be OpenAI-format JSON with
its rule and ``Connection: close``, and must never carry a byte of the input.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from llm_warden.proxy.config import ServerConfig, load_config
from llm_warden.proxy.edge import Listener, parse_error, start_listener
from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.testing import RunningWarden
from tests.conftest import WardenFactory
from tests.fakeprovider import FakeProvider, Reply

MARK = b"Zq7SECRETmark"
TOKEN = b"eyJhbGciOiJSUzI1NiJ9." + MARK + b".sig"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes
    closed: bool

    def error(self) -> dict[str, Any]:
        doc = orjson.loads(self.body)
        assert set(doc) == {"error"}, doc
        err = doc["error"]
        assert set(err) == {"message", "type", "code", "param"}, err
        assert isinstance(err["message"], str) and isinstance(err["type"], str) and isinstance(err["code"], str)
        return dict(err)


def parse_answer(raw: bytes, closed: bool) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response: {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", len(body)))
    return Answer(status, headers, body[:n], raw, closed)


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``timeout`` passes (False)."""
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        sock.settimeout(max(0.01, end - time.monotonic()))
    return b"".join(chunks), False


def _exchange(port: int, data: bytes, timeout: float, one: bool = False) -> tuple[bytes, bool]:
    """Send ``data``; read until the server closes (or, with ``one``, until one whole response came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not one:
            return _read_all(sock, timeout)
        got = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep:
                lengths = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                if lengths and len(body) >= int(lengths[0].split(b":")[1]):
                    return got, False
            sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
        return got, False


async def send_raw(port: int, data: bytes, within_s: float = 5.0) -> Answer:
    """Send ``data`` on a fresh connection; the whole answer, and whether the server closed."""
    raw, closed = await asyncio.to_thread(_exchange, port, data, within_s)
    return parse_answer(raw, closed)


def _trickle(port: int, data: bytes, every_s: float, limit_s: float) -> tuple[bytes, bool, float]:
    """Send ``data`` one byte per ``every_s`` until the server answers or closes."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        for i in range(len(data)):
            try:
                sock.sendall(data[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(every_s)
            try:
                sock.recv(1, socket.MSG_PEEK)  # returns once the server answered or closed
                break
            except TimeoutError:
                if time.monotonic() - start > limit_s:
                    break
            except ConnectionResetError:
                break
        raw, closed = _read_all(sock, limit_s)
    return raw, closed, time.monotonic() - start


def assert_no_echo(answer: Answer, sent: bytes) -> None:
    assert MARK not in answer.raw, "the answer quotes the input"
    assert b"SECRET" not in answer.raw and b"eyJhbGci" not in answer.raw
    # No 12-byte run of the input comes back, besides HTTP's own vocabulary (header names).
    fixed = (b"HTTP/1.", b"Content-Length", b"Content-Type", b"Transfer-Encoding", b"Connection", b"application/json", b"chunked")
    for i in range(0, max(0, len(sent) - 12), 7):
        piece = sent[i : i + 12]
        if any(f in piece or piece in f for f in fixed) or len(set(piece)) < 4:
            continue
        assert piece not in answer.body, f"the answer body quotes the input: {piece!r}"


def assert_refusal(answer: Answer, status: int, rule: str) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.raw[:400])
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers.get("connection", "").lower() == "close"
    err = answer.error()
    assert err["message"].endswith(f"(rule: {rule})"), err
    assert answer.closed, "the connection closes after an HTTP-layer refusal"
    return err


# -- both listeners of a real Warden, behind the edge ----------------------------------------


@dataclass
class Edge:
    rw: RunningWarden
    data: Listener
    admin: Listener

    def port(self, which: str) -> int:
        return (self.data if which == "data" else self.admin).port

    async def metrics_text(self) -> str:
        return self.rw.warden.metrics.exposition().decode()


EdgeFactory = Callable[..., Any]


@pytest.fixture
async def edge_factory(warden_factory: WardenFactory) -> AsyncIterator[EdgeFactory]:
    made: list[Edge] = []

    async def make(server: dict[str, Any] | None = None, **overrides: Any) -> Edge:
        rw = await warden_factory({"server": server or {}, **overrides})
        w = rw.warden
        data = await start_listener(w.data_app(), "data", w.config.server, w.metrics, "127.0.0.1", 0)
        admin = await start_listener(w.admin_app(), "admin", w.config.server, w.metrics, "127.0.0.1", 0)
        e = Edge(rw, data, admin)
        made.append(e)
        return e

    yield make
    for e in made:
        await e.data.cleanup()
        await e.admin.cleanup()


@pytest.fixture
async def edge(edge_factory: EdgeFactory) -> Edge:
    e: Edge = await edge_factory()
    return e


def _chat(extra_headers: bytes = b"", body: bytes = b'{"model":"m","messages":[{"role":"user","content":"x"}]}') -> bytes:
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra_headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


MALFORMED: dict[str, tuple[bytes, int, str]] = {
    "token_header_100kb": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN + b"A" * 100_000 + b"\r\n\r\n", 431, "server.max_header_bytes"),
    "url_10kb": (b"GET /v1/" + MARK * 800 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "server.max_url_bytes"),
    "http10_body_without_length": (b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer " + TOKEN + b"\r\n\r\n{\"model\":\"" + MARK + b"\"}", 400, "http.framing"),
    "unknown_method": (b"FOO /v1/" + MARK + b" HTTP/1.1\r\nHost: x\r\n\r\n", 501, "http.method"),
    "garbage_method": (b"\x01\x02" + MARK + b" / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "http.method"),
    "content_length_and_chunked": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX-T: " + MARK + b"\r\n\r\n0\r\n\r\n", 400, "http.framing"),
    "chunked_then_content_length": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nX-T: " + MARK + b"\r\n\r\n0\r\n\r\n", 400, "http.framing"),
    "duplicate_content_length": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\nX-T: " + MARK + b"\r\n\r\n{}", 400, "http.framing"),
    "bad_header_name_byte": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad\x01" + MARK + b": v\r\n\r\n", 400, "http.header"),
    "nul_in_header_value": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN + b"\x00" + MARK + b"\r\n\r\n", 400, "http.header"),
    "too_many_headers": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, MARK) for i in range(150)) + b"\r\n", 431, "server.max_headers"),
    "tls_client_hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARK * 4, 400, "http.parse"),
    "http11_without_host": (b"GET /v1/" + MARK + b" HTTP/1.1\r\n\r\n", 400, "http.header"),
    "bad_chunk_size": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ" + MARK + b"\r\n", 400, "http.framing"),
    "unknown_transfer_coding": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + MARK + b"\r\n\r\n", 400, "http.framing"),
    "http_version_9": (b"GET /v1/" + MARK + b" HTTP/9.9\r\nHost: x\r\n\r\n", 400, "http.version"),
    "absolute_url_bad_host": (b"GET http://" + MARK + b"@[bad HTTP/1.1\r\nHost: x\r\n\r\n", 400, "http.url"),
    "space_in_target": (b"GET /v1/a " + MARK + b" b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "http.version"),
    "bare_lf_header_folding": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\r\n " + MARK + b"\r\n\r\n", 400, "http.header"),
}


@pytest.mark.parametrize("listener", ["data", "admin"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_parser_errors_are_json_without_the_input(edge: Edge, listener: str, case: str) -> None:
    data, status, rule = MALFORMED[case]
    answer = await send_raw(edge.port(listener), data)
    assert_refusal(answer, status, rule)
    assert_no_echo(answer, data)
    assert f'warden_http_errors_total{{listener="{listener}",rule="{rule}"}} 1.0' in await edge.metrics_text()


async def test_limits_follow_the_config(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"max_url_bytes": 512, "max_header_bytes": 2048, "max_headers": 10})
    port = e.port("data")
    ok = await send_raw(port, b"GET /v1/" + b"a" * 400 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.status == 401, "within the bounds: reaches the data plane (no token)"
    assert_refusal(await send_raw(port, b"GET /v1/" + b"a" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414, "server.max_url_bytes")
    assert_refusal(await send_raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 2100 + b"\r\n\r\n"), 431, "server.max_header_bytes")
    assert_refusal(await send_raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-A: a\r\n" * 11 + b"\r\n"), 431, "server.max_headers")


async def test_equal_url_and_header_limits_still_tell_which(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"max_url_bytes": 4096, "max_header_bytes": 4096})
    port = e.port("admin")
    assert_refusal(await send_raw(port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 414, "server.max_url_bytes")
    assert_refusal(await send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: /" + b"a" * 5000 + b"\r\n\r\n"), 431, "server.max_header_bytes")


async def test_a_valid_request_still_passes(edge: Edge, token: Callable[..., str]) -> None:
    auth = b"Authorization: Bearer " + token().encode() + b"\r\n"
    answer = await send_raw(edge.port("data"), _chat(auth + b"Connection: close\r\n"))
    assert answer.status == 200, answer.raw[:300]
    assert orjson.loads(answer.body)["choices"][0]["message"]["content"]
    probe = await send_raw(edge.port("admin"), b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert probe.status == 200


async def test_odd_request_targets_get_json_not_aiohttp_pages(edge: Edge) -> None:
    for listener in ("data", "admin"):
        for data in (b"CONNECT " + MARK + b".example:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"):
            raw, closed = await asyncio.to_thread(_exchange, edge.port(listener), data, 3.0, True)
            answer = parse_answer(raw, closed)
            assert answer.status in (401, 404), answer.raw[:300]
            assert answer.headers["content-type"].startswith("application/json")
            answer.error()
            assert_no_echo(answer, data)


async def test_a_bad_content_encoding_is_a_client_error(edge: Edge) -> None:
    """An undecodable gzip body on the admin plane (whose handlers read bodies with aiohttp)."""
    data = b"POST /admin/reload HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 13\r\n\r\n" + MARK
    answer = await send_raw(edge.port("admin"), data)
    assert answer.status in (400, 401)
    answer.error()
    assert_no_echo(answer, data)


# -- a seeded fuzz over mutations of valid requests -------------------------------------------

FUZZ_SEED = 20260507
FUZZ_CASES = 300


def _mutations(n: int) -> list[bytes]:
    rnd = random.Random(FUZZ_SEED)
    base = _chat(b"Authorization: Bearer " + TOKEN + b"\r\nX-Note: " + MARK + b"\r\n")
    specials = [b"\r", b"\n", b"\x00", b"\x7f", b"\xff", b" ", b":", b"\t", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 9999999999999999999\r\n", b"%", b"?", b"#"]
    out = []
    for _ in range(n):
        buf = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.random()
            pos = rnd.randrange(len(buf))
            if op < 0.35:
                buf[pos] = rnd.randrange(256)
            elif op < 0.7:
                buf[pos:pos] = rnd.choice(specials)
            elif op < 0.85:
                del buf[pos : pos + rnd.randint(1, 8)]
            else:
                buf[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
        out.append(bytes(buf))
    return out


async def test_fuzzed_requests_never_echo_never_hang(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"header_timeout_s": 0.5, "body_timeout_s": 0.5})
    port = e.port("data")
    statuses: dict[int, int] = {}
    for data in _mutations(FUZZ_CASES):
        raw, closed = await asyncio.to_thread(_exchange, port, data, 3.0, True)
        if not raw:
            assert closed, "no answer and no close: the connection hangs"
            statuses[0] = statuses.get(0, 0) + 1
            continue
        answer = parse_answer(raw, closed)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        assert answer.status != 500, answer.raw[:400]
        assert answer.headers["content-type"].startswith("application/json"), answer.raw[:400]
        if answer.status >= 400:
            answer.error()
        assert MARK not in answer.raw, (data, answer.raw[:400])
    assert sum(statuses.values()) == FUZZ_CASES
    assert len(statuses) >= 3, statuses


# -- timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["data", "admin"])
async def test_slow_headers_get_408_within_the_header_timeout(edge_factory: EdgeFactory, listener: str) -> None:
    e = await edge_factory({"header_timeout_s": 0.6})
    slow = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN + b"\r\n\r\n"
    raw, closed, took = await asyncio.to_thread(_trickle, e.port(listener), slow, 0.05, 5.0)
    answer = parse_answer(raw, closed)
    assert_refusal(answer, 408, "server.header_timeout_s")
    assert_no_echo(answer, slow)
    assert 0.5 <= took < 1.5, took
    assert f'warden_http_errors_total{{listener="{listener}",rule="server.header_timeout_s"}} 1.0' in await e.metrics_text()


async def test_silent_connection_closed_without_an_answer(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"header_timeout_s": 0.4})
    start = time.monotonic()
    raw, closed = await asyncio.to_thread(_exchange, e.port("data"), b"", 3.0)
    assert raw == b"" and closed
    assert time.monotonic() - start < 1.5


def _keepalive_then_slow(port: int, first: bytes, idle_s: float, slow: bytes, every_s: float) -> tuple[bytes, bytes, bool, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(first)
        sock.settimeout(5)
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        head, _, rest = got.partition(b"\r\n\r\n")
        n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
        while len(rest) < n:
            rest += sock.recv(65536)
        time.sleep(idle_s)
        start = time.monotonic()
        for i in range(len(slow)):
            try:
                sock.sendall(slow[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(every_s)
            try:
                sock.recv(1, socket.MSG_PEEK)  # returns once the server answered or closed
                break
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
        raw, closed = _read_all(sock, 3)
        return got, raw, closed, time.monotonic() - start


async def test_header_timeout_counts_from_the_first_byte_on_a_kept_alive_connection(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"header_timeout_s": 0.5, "keepalive_timeout_s": 5.0})
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    slow = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + MARK * 20 + b"\r\n\r\n"
    got, raw, closed, took = await asyncio.to_thread(_keepalive_then_slow, e.port("admin"), first, 0.8, slow, 0.05)
    assert got.startswith(b"HTTP/1.1 200")
    answer = parse_answer(raw, closed)
    assert_refusal(answer, 408, "server.header_timeout_s")
    # Idle for 0.8 s (longer than the header timeout) and still answered 408, not
    # closed at once: the timer started with the request's first byte.
    assert 0.4 <= took < 1.4, took


def _idle_after_one(port: int, request: bytes, wait_s: float) -> tuple[bytes, bool, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        start = time.monotonic()
        raw, closed = _read_all(sock, wait_s)
        return raw, closed, time.monotonic() - start


async def test_idle_keepalive_connection_is_closed(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"keepalive_timeout_s": 0.5, "header_timeout_s": 5.0})
    raw, closed, took = await asyncio.to_thread(_idle_after_one, e.port("admin"), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 4.0)
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.count(b"HTTP/1.1") == 1, "nothing is sent when an idle connection closes"
    assert closed and took < 2.5, took


def _slow_body(port: int, head: bytes, part: bytes, limit_s: float) -> tuple[bytes, bool, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(head + part)
        start = time.monotonic()
        raw, closed = _read_all(sock, limit_s)
        return raw, closed, time.monotonic() - start


async def test_slow_body_gets_408_within_the_body_timeout(edge_factory: EdgeFactory, token: Callable[..., str]) -> None:
    e = await edge_factory({"body_timeout_s": 0.6})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token().encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    raw, closed, took = await asyncio.to_thread(_slow_body, e.port("data"), head, b'{"model":"' + MARK, 5.0)
    answer = parse_answer(raw, closed)
    assert_refusal(answer, 408, "server.body_timeout_s")
    assert_no_echo(answer, head + MARK)
    assert 0.5 <= took < 1.5, took
    assert 'warden_http_errors_total{listener="data",rule="server.body_timeout_s"} 1.0' in await e.metrics_text()


def _two_parts(port: int, first: bytes, second: bytes, pause_s: float) -> tuple[bytes, bool, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(first)
        time.sleep(pause_s)
        sock.sendall(second)
        start = time.monotonic()
        raw, closed = _read_all(sock, 8)
        return raw, closed, time.monotonic() - start


async def test_a_framing_error_inside_a_body_is_answered_at_once(edge_factory: EdgeFactory, token: Callable[..., str]) -> None:
    """The handler is already reading the body when a bad chunk arrives: 400 now, not 408 at body_timeout_s."""
    e = await edge_factory({"body_timeout_s": 5.0})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token().encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n"
    raw, closed, took = await asyncio.to_thread(_two_parts, e.port("data"), head, b"ZZ" + MARK + b"\r\n", 0.3)
    answer = parse_answer(raw, closed)
    assert_refusal(answer, 400, "http.framing")
    assert_no_echo(answer, MARK)
    assert took < 1.0, took
    assert raw.count(b"HTTP/1.") == 1, "one answer only"


async def test_a_complete_body_is_not_cut_by_the_body_timer(edge_factory: EdgeFactory, fake: FakeProvider, token: Callable[..., str]) -> None:
    """A body that arrived in time, then a stream that runs well past body_timeout_s."""
    e = await edge_factory({"body_timeout_s": 0.3})
    fake.push(Reply(content=" ".join(f"w{i}" for i in range(8)), chunk_delay_s=0.1))
    auth = b"Authorization: Bearer " + token().encode() + b"\r\n"
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}'
    answer = await send_raw(e.port("data"), _chat(auth + b"Connection: close\r\n", body), within_s=5.0)
    assert answer.status == 200
    assert b"w7" in answer.raw and b"data: [DONE]" in answer.raw


# -- connection bound ---------------------------------------------------------------------------


def _hold(port: int, n: int) -> list[socket.socket]:
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /v1/mo")  # headers begun, never finished
        held.append(s)
    return held


async def _wait_for(cond: Callable[[], bool], within_s: float = 3.0) -> None:
    end = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("listener", ["data", "admin"])
async def test_connections_beyond_the_bound_get_503(edge_factory: EdgeFactory, listener: str) -> None:
    e = await edge_factory({"max_connections": 3, "header_timeout_s": 30.0})
    lst = e.data if listener == "data" else e.admin
    held = await asyncio.to_thread(_hold, lst.port, 3)
    try:
        await _wait_for(lambda: lst.open_connections == 3)
        answer = await send_raw(lst.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 503
        assert answer.headers["connection"] == "close" and answer.headers["retry-after"] == "1"
        assert answer.error()["message"].endswith("(rule: server.max_connections)")
        assert answer.closed
        text = await e.metrics_text()
        assert f'warden_connections_refused_total{{listener="{listener}"}} 1.0' in text
        assert f'warden_connections_open{{listener="{listener}"}} 3.0' in text
        held.pop().close()
        await _wait_for(lambda: lst.open_connections == 2)
        ok = await send_raw(lst.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.status in (200, 401)
    finally:
        for s in held:
            s.close()
    await _wait_for(lambda: lst.open_connections == 0)


def _burst(port: int, n: int) -> tuple[list[socket.socket], list[bytes]]:
    """Open ``n`` connections at once (all in the listen backlog before the server accepts any)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    time.sleep(0.5)
    answers = []
    for s in socks:
        s.settimeout(0.2)
        try:
            answers.append(s.recv(4096))
        except (TimeoutError, ConnectionResetError, BlockingIOError):
            answers.append(b"")
    return socks, answers


async def test_a_burst_of_connections_does_not_overshoot_the_bound(edge_factory: EdgeFactory) -> None:
    e = await edge_factory({"max_connections": 10, "header_timeout_s": 30.0})
    socks, answers = await asyncio.to_thread(_burst, e.port("data"), 60)
    try:
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) == 50, [a[:20] for a in answers]
        assert e.data.open_connections == 10
    finally:
        for s in socks:
            s.close()
    await _wait_for(lambda: e.data.open_connections == 0)


async def test_a_connection_counts_until_its_handler_ends(edge: Edge, fake: FakeProvider, token: Callable[..., str]) -> None:
    """A client that leaves mid-request does not free its slot before its handler (and record) are done."""
    fake.push(Reply(delay_s=0.8))
    auth = b"Authorization: Bearer " + token().encode() + b"\r\n"
    sock = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", edge.port("data")), 5)
    sock.sendall(_chat(auth))
    await _wait_for(lambda: len(fake.requests) == 1)
    sock.close()
    await asyncio.sleep(0.2)
    assert edge.data.open_connections == 1, "the handler still runs"
    await _wait_for(lambda: edge.data.open_connections == 0, 5.0)


# -- drain steps in process ----------------------------------------------------------------------


async def test_begin_drain_closes_idle_connections_and_refuses_new_ones(edge: Edge) -> None:
    def idle_conn() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", edge.port("admin")), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"}" not in got:
            got += s.recv(65536)
        return s

    s = await asyncio.to_thread(idle_conn)
    port = edge.port("admin")
    await _wait_for(lambda: edge.admin.open_connections == 1)
    await edge.admin.stop_accepting()
    edge.admin.begin_drain()
    assert await edge.admin.wait_closed(2.0)
    s.settimeout(2)
    assert s.recv(10) == b""
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- config and classification ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_url_bytes", 100), ("max_header_bytes", 10), ("max_headers", 0), ("max_connections", 0), ("header_timeout_s", 0), ("body_timeout_s", -1), ("keepalive_timeout_s", 0)],
)
def test_edge_keys_are_validated(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"server": {key: value}, "auth": {"mode": "none"}, "audit": {"enabled": False}})
    assert e.value.key == f"server.{key}"


def test_an_unknown_parser_error_gets_the_generic_message() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    err = parse_error(BadHttpMessage("Something new:\n\n  b'" + MARK.decode() + "'\n  ^"), ServerConfig())
    assert err.status == 400 and err.rule == "http.parse"
    assert MARK.decode() not in err.message
