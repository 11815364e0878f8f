"""The HTTP edge of both listeners: parser errors, client timeouts, connection bounds, drain.

aiohttp's low-level server parses requests.  Left alone it answers a
malformed request with a ``text/plain`` page quoting up to 100 bytes of the
input (a token's prefix included), gives a client unlimited time to send its
headers, and accepts any number of connections.  :class:`Listener` runs an
application behind a subclass of aiohttp's connection protocol
(:class:`aiohttp.web_protocol.RequestHandler`) that closes these gaps at the
seams aiohttp offers:

- ``handle_error`` (every error aiohttp answers itself: parser errors, and
  exceptions a handler let escape) renders a JSON error with the status that
  fits (400, 408, 414, 431, 501...), a rule, ``Connection: close`` and a
  fixed message: never a byte of the input.  The error is in the format of
  the API the request's path belongs to, chosen as the pipeline chooses it
  (:func:`proxy.protocols.protocol_for_path`; for a parser error the path is
  read from the request line, when it arrived): Anthropic's under
  ``/v1/messages``, OpenAI's elsewhere.  A connection refused before any
  byte is read (``max_connections``) has no path: OpenAI's format;
- the server's request factory marks the moment a request's headers are
  complete (the header timer stops, the body timer starts);
- ``connection_made`` / ``connection_lost`` count the listener's open
  connections and refuse those beyond ``[server] max_connections``.

Timers (``[server]`` keys):

- ``header_timeout_s``: from the connection's start (first request) or from
  the first byte of a later request on a kept-alive connection, the headers
  must be complete within it; otherwise ``408`` (rule
  ``server.header_timeout_s``) and close.  A connection that sent nothing is
  closed without an answer.
- ``body_timeout_s``: from the end of the headers, the whole body must arrive
  within it; otherwise the handler's body read fails with ``408`` (rule
  ``server.body_timeout_s``) and the connection closes after the answer.
- ``keepalive_timeout_s``: an idle kept-alive connection is closed.

A few of aiohttp's private parts are read (``_waiter``: is the connection
waiting for its next request; ``_task_handler``: the connection's task;
``_messages`` and ``_ErrInfo``: a parser error queued while a body is being
read); this module refuses to import, and ``tests/proxy/test_edge.py``
fails, if a new aiohttp changes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, InvalidHeader, InvalidURLError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from llm_warden.proxy.config import ServerConfig
from llm_warden.proxy.errors import WardenError, error_body
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.metrics import Metrics
from llm_warden.proxy.protocols import adapter_for, protocol_for_path

log = logging.getLogger("warden.edge")


class RequestTimeout(WardenError):
    """A client too slow to send its request (408); the connection closes after the answer."""

    status, type, code = 408, "invalid_request_error", "request_timeout"

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message, rule=rule, headers={"Connection": "close"})


# -- errors aiohttp's parser raises, as fixed OpenAI-format errors ------------------------

_PARSE = ("http.parse", "the request is not valid HTTP/1.1")
_FRAMING = "http.framing"
_HEADER = "http.header"
_URL = "http.url"
_VERSION = "http.version"

# Reasons llhttp and aiohttp give, each a fixed string that holds no input: the
# message sent to the client is ours, chosen by the reason; any other reason
# gets the generic message.
_REASONS: dict[str, tuple[str, str]] = {
    "Content-Length can't be present with Transfer-Encoding": (_FRAMING, "Content-Length and Transfer-Encoding must not be sent together"),
    "Transfer-Encoding can't be present with Content-Length": (_FRAMING, "Content-Length and Transfer-Encoding must not be sent together"),
    "Duplicate Content-Length": (_FRAMING, "Content-Length appears more than once"),
    "Empty Content-Length": (_FRAMING, "Content-Length is empty"),
    "Invalid character in Content-Length": (_FRAMING, "Content-Length is not a number"),
    "Content-Length overflow": (_FRAMING, "Content-Length is too large"),
    "Data after `Connection: close`": (_FRAMING, "bytes follow the end of the request; a request body needs Content-Length or chunked Transfer-Encoding"),
    "Request has invalid `Transfer-Encoding`": (_FRAMING, "Transfer-Encoding must end with chunked"),
    "Invalid `Transfer-Encoding` header value": (_FRAMING, "Transfer-Encoding has an invalid value"),
    "Invalid character in chunk size": (_FRAMING, "a chunk size is not hexadecimal"),
    "Chunk size overflow": (_FRAMING, "a chunk size is too large"),
    "Invalid header token": (_HEADER, "a header name has a character that is not allowed"),
    "Invalid header field char": (_HEADER, "a header name has a character that is not allowed"),
    "Invalid header value char": (_HEADER, "a header value has a character that is not allowed"),
    "Unexpected whitespace after header value": (_HEADER, "a header line is malformed"),
    "Missing expected CR after header value": (_HEADER, "a header line is malformed"),
    "Missing expected LF after header value": (_HEADER, "a header line is malformed"),
    "Expected LF after headers": (_HEADER, "the header block is malformed"),
    "Too many headers received": ("server.max_headers", "too many header lines"),
    "Missing 'Host' header in request.": (_HEADER, "an HTTP/1.1 request needs a Host header"),
    "Invalid char in url path": (_URL, "the request target has a character that is not allowed"),
    "Invalid char in url query": (_URL, "the request target has a character that is not allowed"),
    "Invalid char in url fragment start": (_URL, "the request target has a character that is not allowed"),
    "Invalid characters in url": (_URL, "the request target has a character that is not allowed"),
    "Unexpected char in url schema": (_URL, "the request target is malformed"),
    "Unexpected char in url server": (_URL, "the request target is malformed"),
    "Unexpected start char in url": (_URL, "the request target is malformed"),
    "Invalid HTTP version": (_VERSION, "only HTTP/1.0 and HTTP/1.1 are served"),
    "Invalid major version": (_VERSION, "only HTTP/1.0 and HTTP/1.1 are served"),
    "Invalid minor version": (_VERSION, "only HTTP/1.0 and HTTP/1.1 are served"),
    "Expected HTTP/, RTSP/ or ICE/": (_VERSION, "only HTTP/1.0 and HTTP/1.1 are served"),
    "Received HTTPS traffic on an HTTP port": ("http.parse", "this port speaks plain HTTP, not TLS"),
}
_DUPLICATE_SINGLETON = re.compile(r"^Duplicate '[A-Za-z-]+' header found\.$")
# An RFC 9110 method token followed by a space: a request whose method is merely
# unknown (501) rather than garbage (400).
_METHOD_TOKEN = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32} ")


def _reason(exc: HttpProcessingError) -> str:
    text = exc.message or ""
    if text.startswith("Bad status line:\n  "):
        text = text[len("Bad status line:\n  ") :]
    return text.split(":\n\n", 1)[0]


def parse_error(exc: BaseException, cfg: ServerConfig, head: bytes = b"", line_end: int | None = None) -> WardenError:
    """The error to answer for one of aiohttp's parser exceptions; its message holds no byte of the input.

    ``head`` is the start of the request as received (only matched against a
    pattern, never quoted), to tell an unknown method (501) from garbage (400);
    ``line_end`` is the offset of the request line's end in the message
    (``None``: not received), to tell an over-long target from an over-long
    header when both limits are equal.
    """
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if cfg.max_url_bytes != cfg.max_header_bytes:
            is_url = limit == cfg.max_url_bytes
        else:
            # Equal limits: the request line was too long if it had not ended within the limit.
            is_url = line_end is None or line_end > cfg.max_url_bytes
        if is_url:
            return WardenError(f"the request target is longer than {cfg.max_url_bytes} bytes", status=414, code="uri_too_long", rule="server.max_url_bytes")
        return WardenError(f"a header line is longer than {cfg.max_header_bytes} bytes", status=431, code="request_header_fields_too_large", rule="server.max_header_bytes")
    if isinstance(exc, BadHttpMethod):
        if _reason(exc) == "Received HTTPS traffic on an HTTP port":
            rule, message = _REASONS["Received HTTPS traffic on an HTTP port"]
            return WardenError(message, status=400, rule=rule)
        if _METHOD_TOKEN.match(head):
            return WardenError("the request method is not implemented", status=501, code="not_implemented", rule="http.method")
        return WardenError("the request line is malformed", status=400, rule="http.method")
    if isinstance(exc, InvalidHeader):
        return WardenError("a header has a character that is not allowed", status=400, rule=_HEADER)
    if isinstance(exc, HttpProcessingError):
        reason = _reason(exc)
        if reason == "Too many headers received":
            return WardenError(f"more than {cfg.max_headers} header lines", status=431, code="request_header_fields_too_large", rule="server.max_headers")
        found = _REASONS.get(reason)
        if found is None and _DUPLICATE_SINGLETON.match(reason):
            found = (_HEADER, "a header that may appear once appears more than once")
        if found is None and isinstance(exc, InvalidURLError):
            found = (_URL, "the request target is malformed")
        rule, message = found or _PARSE
        return WardenError(message, status=400, rule=rule)
    return WardenError(*_PARSE[1:], status=400, rule=_PARSE[0])


_TARGET = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32} (/[A-Za-z0-9._~:@!$&'()*+,;=/-]*)")
_HEAD_BYTES = 64
"""How much of a request's first bytes the protocol keeps (``_head``)."""


def target_path(head: bytes) -> str | None:
    """The path of the request line at the start of ``head`` (``None``: it did not arrive or is malformed).

    ``head`` is at most :data:`_HEAD_BYTES` long: a path that runs to its end
    is its prefix, which is enough to tell which API it belongs to.  Only
    used to choose the error format; never quoted.
    """
    m = _TARGET.match(head)
    if m is None:
        return None
    end = m.end()
    if end < len(head) and head[end : end + 1] not in (b" ", b"?", b"#"):
        return None
    if end == len(head) and len(head) < _HEAD_BYTES:
        return None  # the request line is still arriving: its path may go on
    return m.group(1).decode("ascii")


def edge_error_body(err: WardenError, path: str | None) -> bytes:
    """``err`` in the format of the API that ``path`` belongs to (the pipeline's choice by path); OpenAI's without a path."""
    if path is None:
        return error_body(err)
    ex = Exchange(request_id="req_" + os.urandom(12).hex(), route="unrouted", method="", path=path)
    return adapter_for(protocol_for_path(path)).error_body(ex, err)


def _raw_response(status: int, reason: str, err: WardenError, extra: str = "", path: str | None = None) -> bytes:
    """A whole HTTP/1.1 response written straight to a transport (no request is being handled)."""
    body = edge_error_body(err, path)
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    return head.encode("ascii") + body


# -- metrics -------------------------------------------------------------------------------


class EdgeMetrics:
    """The edge's metrics, defined once on a server's :class:`~proxy.metrics.Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.listeners: dict[str, Listener] = {}
        self.open = metrics.gauge(
            "warden_connections_open",
            "Open client connections, by listener (data, admin); a closed connection counts until its handler ends.",
            ["listener"],
            callback=lambda: {name: len(lst.connections) for name, lst in self.listeners.items()},
        )
        self.refused = metrics.counter("warden_connections_refused", "Connections refused because the listener had [server] max_connections open, by listener.", ["listener"])
        self.errors = metrics.counter("warden_http_errors", "Requests refused at the HTTP layer (malformed, too large, too slow), by listener and rule.", ["listener", "rule"])


_METRICS: weakref.WeakKeyDictionary[Metrics, EdgeMetrics] = weakref.WeakKeyDictionary()


def edge_metrics(metrics: Metrics) -> EdgeMetrics:
    """The edge metrics on ``metrics`` (defined the first time)."""
    found = _METRICS.get(metrics)
    if found is None:
        found = _METRICS[metrics] = EdgeMetrics(metrics)
    return found


# -- the connection protocol -----------------------------------------------------------------


class EdgeProtocol(RequestHandler):
    """One client connection: aiohttp's protocol with bounded header and body time and JSON errors.

    Both bounds are deadlines checked by one timer per connection, which is
    created only when none is pending and rescheduled when it fires early:
    a kept-alive connection serving requests back to back creates no timer
    per request.
    """

    __slots__ = (
        "_listener",
        "_timer",
        "_timer_at",
        "_header_deadline",
        "_body_deadline",
        "_body",
        "_head",
        "_seen",
        "_line_end",
        "_released",
    )

    def __init__(self, manager: EdgeServer, listener: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._header_deadline = 0.0  # 0: no request's headers are awaited
        self._body_deadline = 0.0  # 0: no body is awaited
        self._body: StreamReader | None = None
        self._head = b""
        self._seen = 0
        self._line_end: int | None = None
        self._released = False
        # Counted from here, not from connection_made: the loop may accept a batch of
        # connections (calling the factory for each) before any connection_made runs.
        listener.connection_opened(self)

    # connection lifetime ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._expect_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._body = None
        task = self._task_handler
        super().connection_lost(exc)
        if task is not None and not task.done():
            # The handler may still be finishing (its audit record, say): the
            # connection counts until it has.
            task.add_done_callback(lambda _t: self._release())
        else:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._listener.connection_closed(self)

    def _idle(self) -> bool:
        """Waiting for the next request (no request is being handled or lingered over)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    # header and body deadlines ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._header_deadline and data:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                self._expect_headers()  # the first byte of a request on a kept-alive connection
        if self._line_end is None and data:
            if len(self._head) < _HEAD_BYTES:
                self._head += data[: _HEAD_BYTES - len(self._head)]  # a request line may arrive in pieces
            i = data.find(b"\n")
            if i >= 0:
                self._line_end = self._seen + i
            self._seen += len(data)
        body = self._body
        if body is None:
            super().data_received(data)
            return
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued and not body.is_eof() and body.exception() is None:
            self._fail_body(body, self._messages[-1][0])

    def _fail_body(self, body: StreamReader, message: object) -> None:
        """A framing error inside a body being read (a bad chunk): the handler's read fails now, not at body_timeout_s."""
        if not isinstance(message, _ErrInfo):
            return
        lst = self._listener
        err = parse_error(message.exc, lst.cfg)
        err.headers["Connection"] = "close"
        lst.metrics.errors.labels(listener=lst.name, rule=err.rule or "http.parse").inc()
        body.set_exception(err)
        self.close()  # the queued parser error is never answered: the connection ends after this response

    def _expect_headers(self) -> None:
        self._head = b""
        self._seen = 0
        self._line_end = None
        self._header_deadline = deadline = self._loop.time() + self._listener.cfg.header_timeout_s
        self._schedule(deadline)

    def request_started(self, payload: StreamReader) -> None:
        """Called by the request factory: the headers are complete, the body (if any) follows."""
        self._header_deadline = 0.0
        if not payload.is_eof():
            self._body = payload
            self._body_deadline = deadline = self._loop.time() + self._listener.cfg.body_timeout_s
            self._schedule(deadline)

    def _schedule(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # fires first, then reschedules for this deadline
            timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        if self._header_deadline and now >= self._header_deadline:
            self._header_deadline = 0.0
            self._header_timeout()
        if self._body_deadline and now >= self._body_deadline:
            self._body_deadline = 0.0
            self._body_timeout()
        pending = [d for d in (self._header_deadline, self._body_deadline) if d]
        if pending and self.transport is not None:
            self._schedule(min(pending))

    def _header_timeout(self) -> None:
        if not self._idle() or self.transport is None:
            return  # a request is being handled; its own bounds apply
        lst = self._listener
        if self._seen:
            lst.metrics.errors.labels(listener=lst.name, rule="server.header_timeout_s").inc()
            err = RequestTimeout(f"the request headers did not arrive within {lst.cfg.header_timeout_s:g} s", rule="server.header_timeout_s")
            self.transport.write(_raw_response(408, "Request Timeout", err, path=target_path(self._head) if self._line_end is not None else None))
            log.debug("header timeout", extra={"listener": lst.name, "rule": err.rule})
        self.force_close()

    def _body_timeout(self) -> None:
        payload, self._body = self._body, None
        if payload is None or payload.is_eof() or payload.exception() is not None:
            return
        lst = self._listener
        lst.metrics.errors.labels(listener=lst.name, rule="server.body_timeout_s").inc()
        # The handler's read of the body raises this WardenError, which it renders
        # (audited, as any refusal); the connection closes after the answer.
        payload.set_exception(RequestTimeout(f"the request body did not arrive within {lst.cfg.body_timeout_s:g} s", rule="server.body_timeout_s"))
        self.close()

    # responses ---------------------------------------------------------------------------

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None) -> tuple[web.StreamResponse, bool]:
        self._body_deadline = 0.0
        self._body = None
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and resp.content_type != "application/json":
            # aiohttp's own answers (no route for an odd request target, say): JSON, never its text page.
            resp = self._json_for_http_exception(resp, request.raw_path.partition("?")[0])
        if self._listener.draining and not resp.prepared:
            resp.force_close()
        return await super().finish_response(request, resp, start_time)

    def _json_for_http_exception(self, exc: web.HTTPException, path: str) -> web.Response:
        status = exc.status
        if status == 404:
            err = WardenError("no such route", status=404, code="not_found", rule="server.routes")
        elif status == 405:
            err = WardenError("method not allowed on this route", status=405, code="method_not_allowed", rule="server.routes")
        elif status == 413:
            err = WardenError(f"request body exceeds {self._listener.cfg.max_body_bytes} bytes", status=413, code="payload_too_large", rule="server.max_body_bytes")
        else:
            err = WardenError(exc.reason or "refused", status=status, code="http_error", rule=f"http.{status}")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.Response(status=status, body=edge_error_body(err, path), content_type="application/json", headers=headers)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        """Every error aiohttp answers itself, as OpenAI-format JSON with ``Connection: close``."""
        lst = self._listener
        if request.writer.output_size > 0:
            # A response already began: nothing can be sent in its place (aiohttp's own contract).
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        # A parser error comes with a stand-in request: the path is read from the request line as it arrived.
        path = target_path(self._head) if isinstance(exc, HttpProcessingError) else request.raw_path.partition("?")[0]
        if isinstance(exc, HttpProcessingError):
            err = parse_error(exc, lst.cfg, self._head, self._line_end)
            log.debug("malformed request", extra={"listener": lst.name, "rule": err.rule, "status": err.status})
        elif isinstance(exc, WardenError):
            err = exc  # a refusal (a body timeout, say) that a handler let escape
        elif isinstance(exc, RequestPayloadError):
            err = WardenError("the request body could not be read: its encoding or framing is invalid", status=400, rule="http.body")
        elif status == 504:
            err = WardenError("the request handler timed out", status=504, type="api_error", code="timeout", rule="server.handler")
        else:
            if exc is not None:
                log.error("unhandled error in a %s request handler", lst.name, exc_info=exc)
            err = WardenError("internal error; see the Warden log", status=500, type="api_error", code="internal_error", rule="server.handler")
        lst.metrics.errors.labels(listener=lst.name, rule=err.rule or "http.parse").inc()
        # No further request on this connection: the parser may be mid-message.
        self.close()
        resp = web.Response(status=err.status, body=edge_error_body(err, path), content_type="application/json", headers={"Connection": "close"})
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, WardenError):
            return  # a body failed by this module: already answered and counted; the connection closes
        super().log_exception(*args, **kw)


class _Refusal(asyncio.Protocol):
    """A connection beyond ``max_connections`` (or during a drain): a fixed 503, then close, before any byte is read.

    Built instead of an :class:`EdgeProtocol` (no parser, no task), so a
    connection flood costs one accept, one write and one close each.
    """

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lst = self._listener
        lst.metrics.refused.labels(listener=lst.name).inc()
        tr: Any = transport
        try:
            tr.write(lst.refusal)
        finally:
            tr.close()

    def data_received(self, data: bytes) -> None:
        """The request of a refused connection is never read."""


# -- the server and its runner --------------------------------------------------------------

_RequestFactory = Callable[[RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"], BaseRequest]


class EdgeServer(web.Server):
    """aiohttp's low-level server, making :class:`EdgeProtocol` connections."""

    def __init__(self, base: web.Server, listener: Listener, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory, handler_cancellation=base.handler_cancellation, loop=loop, **kwargs)
        self._edge_listener = listener
        self._edge_loop = loop
        self._edge_kwargs = kwargs
        inner: _RequestFactory = base.request_factory

        def factory(message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler, writer: AbstractStreamWriter, task: asyncio.Task[None]) -> BaseRequest:
            if isinstance(protocol, EdgeProtocol):
                protocol.request_started(payload)
            return inner(message, payload, protocol, writer, task)

        self.request_factory = factory

    def __call__(self) -> RequestHandler:
        lst = self._edge_listener
        if len(lst.connections) >= lst.max_connections or lst.draining:
            return _Refusal(lst)  # type: ignore[return-value]  # the loop only needs an asyncio.Protocol
        return EdgeProtocol(self, lst, loop=self._edge_loop, **self._edge_kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose server makes :class:`EdgeProtocol` connections."""

    def __init__(self, app: web.Application, listener: Listener, handler_kwargs: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._edge_listener = listener
        self._edge_handler_kwargs = handler_kwargs

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # the app's startup signals run here
        return EdgeServer(base, self._edge_listener, asyncio.get_running_loop(), **self._edge_handler_kwargs)


class Listener:
    """One listening socket serving one application through the edge.

    ``name`` is the metric label (``data`` or ``admin``).  :meth:`start`
    listens; :meth:`stop_accepting`, :meth:`begin_drain`, :meth:`wait_closed`
    and :meth:`abort` are the steps of a drain (see :mod:`proxy.serve`).
    """

    def __init__(self, app: web.Application, name: str, cfg: ServerConfig, metrics: Metrics, *, force_grace_s: float = 0.5) -> None:
        self.name = name
        self.cfg = cfg
        self.max_connections = cfg.max_connections
        self.metrics = edge_metrics(metrics)
        self.draining = False
        self.connections: set[EdgeProtocol] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        err = WardenError("too many open connections; retry shortly", status=503, type="api_error", code="service_unavailable", rule="server.max_connections")
        self.refusal = _raw_response(503, "Service Unavailable", err, "Retry-After: 1\r\n")
        handler_kwargs: dict[str, Any] = {
            "access_log": None,
            "keepalive_timeout": cfg.keepalive_timeout_s,
            "max_line_size": cfg.max_url_bytes,
            "max_field_size": cfg.max_header_bytes,
            "max_headers": cfg.max_headers,
        }
        self.runner = EdgeRunner(app, self, handler_kwargs, handle_signals=False, shutdown_timeout=force_grace_s)
        self.site: web.TCPSite | None = None
        self.metrics.listeners[name] = self

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return int(self.runner.addresses[0][1])

    def connection_opened(self, conn: EdgeProtocol) -> None:
        self.connections.add(conn)
        self._all_closed.clear()

    def connection_closed(self, conn: EdgeProtocol) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def setup(self) -> None:
        """Build the server (the application's startup signals run)."""
        await self.runner.setup()

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        """Listen on ``host:port`` (``port`` 0: any free port)."""
        if self.runner.server is None:
            await self.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True, backlog=backlog)
        await self.site.start()

    async def stop_accepting(self) -> None:
        """Close the listening socket; open connections stay."""
        if self.site is not None:
            site, self.site = self.site, None
            await site.stop()

    def begin_drain(self) -> None:
        """No new request on any connection: idle ones close now, busy ones after their response."""
        self.draining = True
        for conn in list(self.connections):
            if conn._idle():
                conn.force_close()
            else:
                conn.close()

    async def wait_closed(self, within_s: float) -> bool:
        """Wait up to ``within_s`` seconds for every connection to close and its handler to end."""
        if within_s > 0:
            try:
                await asyncio.wait_for(self._all_closed.wait(), within_s)
            except TimeoutError:
                pass
        return self._all_closed.is_set()

    async def abort(self, grace_s: float) -> None:
        """Cancel what still runs, close every connection, and wait up to ``grace_s`` for the handlers' cleanup."""
        for conn in list(self.connections):
            task = conn._task_handler
            if task is not None and not task.done():
                task.cancel()
            conn.force_close()
        await self.wait_closed(grace_s)

    async def cleanup(self) -> None:
        """Stop listening, close what is left and run the application's cleanup signals."""
        await self.stop_accepting()
        await self.runner.cleanup()


async def start_listener(app: web.Application, name: str, cfg: ServerConfig, metrics: Metrics, host: str, port: int, *, backlog: int = 1024) -> Listener:
    """Build a :class:`Listener` for ``app`` and start listening on ``host:port``."""
    lst = Listener(app, name, cfg, metrics)
    await lst.start(host, port, backlog=backlog)
    return lst


def _check_aiohttp() -> None:
    """The private parts of aiohttp's protocol this module reads must exist (fail at import, not at the first request)."""
    slots = set(getattr(RequestHandler, "__slots__", ()))
    missing = {"_waiter", "_task_handler", "_messages", "_loop"} - slots - set(getattr(RequestHandler.__mro__[1], "__slots__", ()))
    if missing:
        raise ImportError(f"proxy.edge needs aiohttp's RequestHandler attributes {sorted(missing)}; this aiohttp version lacks them")


_check_aiohttp()

__all__ = ["EdgeMetrics", "EdgeProtocol", "Listener", "RequestTimeout", "edge_metrics", "parse_error", "start_listener"]

