"""The one pipeline every data-plane request runs, and its one exit.

::

    identify ─▶ authenticate ─▶ canonical path, route ─▶ parse (bounded) ─▶ request hooks
      ─▶ flow (upstream turns, tool judging, corrective turns) ─▶ response hooks (reverse)
      ─▶ complete hooks (reverse) ─▶ audit record ─▶ send ─▶ observe

Whatever the route, method or fate of a request — refused at any stage,
answered by a plugin's local reply, relayed from the provider, streamed, cut
by the client or by a drain — it passes these stages in this order.  A flow
(``chat``, ``relay``, ``feedback``) *returns* a reply value; only this runner
sends, and only after the record is written from the finished exchange.  A
stream is sent as it is produced, but its end (the usage chunk and
``[DONE]``, or an error event) is sent only after the response and complete
hooks ran and the record was written, so the record holds what was relayed.

The record is written in exactly one place (:meth:`Pipeline._record`): the
exchange's ``phase`` is ``"record"`` only there, and the projector refuses
any other phase.

The API's wire format is the route's protocol adapter's (:mod:`proxy.protocols`):
it reads the credential, parses the body into the internal chat shape the
flows and plugins work on, renders the answer (after the response hooks,
before the record), the stream's events and end, and every refusal — before
routing, the adapter is chosen by path, so all of an API's refusals come back
in its own format.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from llm_warden.proxy.errors import (
    AuditUnavailable,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    WardenError,
    error_body,
    internal_error,
)
from llm_warden.proxy.exchange import Exchange, UpstreamTurn
from llm_warden.proxy.headers import safe_headers, safe_text
from llm_warden.proxy.jsonbounds import depth_exceeds
from llm_warden.proxy.logs import request_line
from llm_warden.proxy.protocols import Bounds, adapter_for, protocol_for_path
from llm_warden.proxy.routes import Match, Route, RouteTable, path_error, ungoverned_reason

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden
    from llm_warden.proxy.upstream import UpstreamResponse

log = logging.getLogger("warden.pipeline")
_SKIP_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key", "mcp-session-id"})
_CLIENT_GONE = (ConnectionError,)


@dataclass(slots=True)
class JsonReply:
    """A whole answer: ``body`` is sent as is unless a response hook changed ``ex.response_body``."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StreamReply:
    """A streamed answer.

    ``events`` yields the bytes to relay as they arrive; it raises a
    ``WardenError`` when the stream goes bad (the runner ends the stream
    with ``error_event``, by default the route's adapter's error event).
    ``trailer`` gives what ends a whole stream (it is called after the
    response hooks, so it sees their changes).
    """

    status: int
    headers: dict[str, str]
    events: AsyncIterator[bytes]
    trailer: Callable[[], list[bytes]] = lambda: []
    error_event: Callable[[WardenError], bytes] | None = None
    release: Callable[[], None] | None = None
    """Frees the upstream response when the stream ends, also when ``events`` never started."""


Reply = JsonReply | StreamReply


@dataclass(frozen=True, slots=True)
class Incoming:
    """What a flow may know of the HTTP request (it never gets the response to send on)."""

    headers: CIMultiDictProxy[str]
    match: Match
    query_string: str
    """The query exactly as the client encoded it (relayed byte for byte; never decoded and re-encoded)."""
    content_type: str | None


Flow = Callable[["Warden", Incoming, Exchange], Awaitable[Reply]]


def _error_reply(ex: Exchange, err: WardenError) -> JsonReply:
    """One of Warden's refusals, rendered by the adapter of the exchange's protocol (its API's error format)."""
    ex.error = err
    ex.status = err.status
    headers = dict(err.headers)
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="warden"'
    try:
        body = adapter_for(ex.protocol).error_body(ex, err)
    except Exception:
        log.exception("rendering an error of request %s failed", ex.request_id)
        body = error_body(err)
    return JsonReply(err.status, body, headers)


def provider_error_reply(ex: Exchange, turn: UpstreamTurn, ur: UpstreamResponse, raw: bytes) -> JsonReply:
    """A provider error status relayed with its body (made OpenAI-shaped, without its bytes, when it is not)."""
    turn.error = f"provider status {ur.status}"
    turn.error_kind = f"status_{ur.status // 100}xx"
    ex.status = ur.status
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        ex.error_detail = safe_text(str(parsed["error"].get("message", "")), 500)
    else:
        ex.error_detail = safe_text(raw[:500].decode("utf-8", "replace"), 500)
        parsed = {"error": {"message": f"the provider answered {ur.status} without an OpenAI-format error", "type": "api_error", "code": "upstream_error", "param": None}}
        raw = orjson.dumps(parsed)
    turn.response = ex.response_body = parsed
    return JsonReply(ur.status, raw, {**ur.relay_headers(), "Content-Type": "application/json"})


class Pipeline:
    """The runner: owns the stages, the record and the send."""

    def __init__(self, w: Warden, flows: dict[str, Flow]) -> None:
        self.w = w
        self.flows = flows
        self.routes = RouteTable(
            w.config.server.passthrough_routes,
            native_anthropic=w.config.upstream.api == "anthropic",
            mcp_servers=tuple(s.name for s in w.config.mcp.servers),
        )
        self.streams: set[asyncio.Task[Any]] = set()
        """Requests relaying a stream."""
        self.waiting: set[asyncio.Task[Any]] = set()
        """Requests between authentication and their reply (waiting on hooks or the provider)."""
        self.cutting = False

    # -- the one handler ----------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        w = self.w
        ex = w.new_exchange(request)
        span = w.tracing.start_exchange(ex, request) if w.tracing is not None else None
        w.inflight += 1
        w.begun += 1
        w.metrics.inflight.inc()
        resp: web.StreamResponse | None = None
        try:
            reply = await self._produce(request, ex)
            if isinstance(reply, StreamReply):
                resp = await self._stream(request, ex, reply)
            else:
                reply = await self._conclude(request, ex, reply)
                resp = self._send(ex, reply)
            return resp
        finally:
            ex.phase = "observe"
            self._observe(ex, resp, span)
            w.inflight -= 1
            w.metrics.inflight.dec()

    # -- identify .. flow ---------------------------------------------------------

    async def _produce(self, request: web.Request, ex: Exchange) -> Reply:
        """Every stage up to the flow; a refusal at any of them is an error reply, never an exception.

        At the drain deadline a request still waiting here is answered 503
        ``server.drain`` (and recorded) instead of being dropped.
        """
        task = asyncio.current_task()
        if task is not None:
            self.waiting.add(task)
        # Until the route is known, the path says which API's format a refusal takes (even the drain's).
        ex.protocol = protocol_for_path(request.raw_path.partition("?")[0])
        try:
            if self.cutting:
                raise _drain_error()
            return await self._stages(request, ex)
        except WardenError as e:
            return _error_reply(ex, e)
        except asyncio.CancelledError:
            if not self.cutting or task is None:
                raise
            task.uncancel()
            return _error_reply(ex, _drain_error())
        finally:
            if task is not None:
                self.waiting.discard(task)

    async def _stages(self, request: web.Request, ex: Exchange) -> Reply:
        w = self.w
        try:
            try:
                ex.request_headers = _captured_headers(request)
                raw_path = request.raw_path.partition("?")[0]
                ex.phase = "authenticate"
                ex.principal = await w.auth.authenticate(adapter_for(ex.protocol).credential(request.headers))
                ex.phase = "route"
                why = path_error(raw_path)
                if why is not None:
                    raise BadRequest(f"the request path is not canonical: {why}", rule="request.path")
                query = _raw_query(request)
                found = self.routes.lookup(request.method, raw_path)
                if not isinstance(found, Match):
                    if found:
                        raise MethodNotAllowed(
                            f"{request.method} is not allowed on this route", rule="server.routes", headers={"Allow": ", ".join(found)}
                        )
                    reason = ungoverned_reason(raw_path)
                    if reason is not None:
                        raise NotFound(f"no route: {reason}", rule="server.routes.ungoverned")
                    raise NotFound("no route for this method and path", rule="server.routes")
                route = found.route
                ex.route = route.name
                ex.protocol = route.protocol
                ex.phase = "parse"
                await self._parse(request, ex, route)
                ex.phase = "request"
                await w.chain.run_request(ex)
                ex.tools_offered = _offered(ex.body)
                ex.phase = "flow"
                if ex.local_reply is not None:
                    return self._local_reply(ex)
                incoming = Incoming(request.headers, found, query, request.headers.get("Content-Type"))
                return await self.flows[route.flow](w, incoming, ex)
            except WardenError as e:
                return _error_reply(ex, e)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error in request %s (stage %s)", ex.request_id, ex.phase)
            return _error_reply(ex, internal_error(ex.request_id))

    async def _parse(self, request: web.Request, ex: Exchange, route: Route) -> None:
        cfg = self.w.config.server
        if request.can_read_body:
            limit = cfg.max_body_bytes
            if request.content_length is not None and request.content_length > limit:
                ex.body_refused = "server.max_body_bytes"
                raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}", rule="server.max_body_bytes")
            try:
                ex.raw_body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                ex.body_refused = "server.max_body_bytes"
                raise PayloadTooLarge(f"request body exceeds {limit} bytes", rule="server.max_body_bytes") from None
            except (RequestPayloadError, BadHttpMessage):
                ex.body_refused = "http.body"
                raise BadRequest("the request body could not be read: its encoding or framing is invalid", rule="http.body") from None
        if not route.parse_json:
            return
        try:
            body = orjson.loads(ex.raw_body)
        except orjson.JSONDecodeError as e:
            ex.body_refused = "request.json"
            raise BadRequest(f"request body is not valid JSON: {safe_text(e.msg, 120)}", rule="request.json") from None
        if not isinstance(body, dict):
            err = adapter_for(route.protocol).not_an_object(body)
            ex.body_refused = err.rule
            raise err
        if depth_exceeds(body, ex.raw_body, cfg.max_json_depth):
            ex.body_refused = "request.json_depth"
            raise BadRequest(f"request body nests deeper than {cfg.max_json_depth} levels", rule="request.json_depth")
        # The route's adapter validates its API's body and sets the internal (chat) representation.
        adapter_for(route.protocol).parse(ex, body, Bounds(cfg.max_messages, cfg.max_tools))

    def _local_reply(self, ex: Exchange) -> Reply:
        lr = ex.local_reply
        assert lr is not None
        ex.status = lr.status
        if lr.sse_events is not None and ex.stream:
            events = list(lr.sse_events)
            renderer = adapter_for(ex.protocol).stream(ex)

            async def relay() -> AsyncIterator[bytes]:
                for payload in events:
                    try:
                        chunk = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        chunk = None
                    out = renderer.event(chunk if isinstance(chunk, dict) else {}, b"data: " + payload + b"\n\n")
                    if out:
                        yield out

            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **lr.headers}
            return StreamReply(lr.status, headers, relay(), trailer=lambda: renderer.end(None, None), error_event=renderer.error)
        return JsonReply(lr.status, lr.body, {"Content-Type": "application/json", **lr.headers})

    # -- response hooks .. record -------------------------------------------------

    async def _conclude(self, request: web.Request, ex: Exchange, reply: JsonReply) -> JsonReply:
        """Response hooks, complete hooks and the record for a whole answer; the reply that will be sent."""
        if ex.status is None:
            ex.status = reply.status
        ex.phase = "response"
        try:
            await self.w.chain.run_response(ex)
        except WardenError as e:
            if ex.error is None:
                reply = _error_reply(ex, e)
        except Exception:
            log.exception("a response hook failed in request %s", ex.request_id)
            if ex.error is None:
                reply = _error_reply(ex, internal_error(ex.request_id))
        if ex.error is None:
            reply = self._render(ex, reply)
        transport = request.transport
        if transport is None or transport.is_closing():
            ex.client_disconnected = True
        await self._complete(ex)
        try:
            await self._record(ex)
        except AuditUnavailable as e:
            reply = _error_reply(ex, e)
        return reply

    def _render(self, ex: Exchange, reply: JsonReply) -> JsonReply:
        """The answer in the API's format, from what the response hooks left (before the record, so it records what is sent)."""
        try:
            body = adapter_for(ex.protocol).render(ex, reply.status, reply.body)
        except WardenError as e:
            return _error_reply(ex, e)
        except Exception:
            log.exception("rendering the answer of request %s failed", ex.request_id)
            return _error_reply(ex, internal_error(ex.request_id))
        return reply if body is reply.body else JsonReply(reply.status, body, reply.headers)

    async def _complete(self, ex: Exchange) -> None:
        ex.phase = "complete"
        ex.ended = time.perf_counter()
        for p in self.w.chain.complete:
            try:
                await p.on_complete(ex)
            except Exception:
                log.exception("plugin %s failed in on_complete", p.name)

    async def _record(self, ex: Exchange) -> None:
        """The record stage: the only place an exchange is written to the audit log."""
        w = self.w
        ex.phase = "record"
        for p in w.chain.audit:
            try:
                fields = p.audit_fields(ex)
            except Exception:
                log.exception("plugin %s failed in audit_fields", p.name)
                fields = {"error": "audit_fields failed"}
            if fields:
                ex.plugin_fields[p.name] = fields
        try:
            if w.audit is None:
                return
            try:
                await w.audit.record_exchange(ex)
            except AuditUnavailable:
                w.metrics.audit_write_failures.inc()
                raise
            except Exception:
                w.metrics.audit_write_failures.inc()
                log.exception("audit write failed for %s", ex.request_id)
                raise AuditUnavailable("the audit log cannot be written; refusing to answer without a record", rule="audit.durability") from None
            w.metrics.audit_records.labels(kind="exchange").inc()
        finally:
            ex.phase = "send"

    # -- send -------------------------------------------------------------------

    def _headers(self, ex: Exchange, base: dict[str, str]) -> dict[str, str]:
        """The reply's headers, then the hooks', then the request id: one entry per name (names are case-insensitive)."""
        out = {k.lower(): v for k, v in base.items()}
        for k, v in ex.response_headers.items():
            out[k.lower()] = v
        for k, v in adapter_for(ex.protocol).headers(ex).items():
            out[k] = v
        out["x-request-id"] = ex.request_id
        return safe_headers(out, ex.request_id)

    def _send(self, ex: Exchange, reply: JsonReply) -> web.Response:
        """Send a whole reply as it is (rendered in the API's format before the record)."""
        base = {"Content-Type": "application/json", **reply.headers}
        return web.Response(status=reply.status, body=reply.body, headers=self._headers(ex, base))

    async def _stream(self, request: web.Request, ex: Exchange, reply: StreamReply) -> web.StreamResponse:
        """Send a stream as it is produced; its end only after the hooks ran and the record is written."""
        if ex.status is None:
            ex.status = reply.status
        resp = web.StreamResponse(status=reply.status, headers=self._headers(ex, reply.headers))
        task = asyncio.current_task()
        err: WardenError | None = None
        if task is not None:
            self.streams.add(task)
        try:
            try:
                if self.cutting:
                    ex.cut = "drain"
                    raise _drain_error()
                await resp.prepare(request)
                async for chunk in reply.events:
                    await resp.write(chunk)
                    ex.relayed_events += 1
                    ex.relayed_bytes += len(chunk)
            except WardenError as e:
                err = e
                ex.cut = ex.cut or "refused"
            except _CLIENT_GONE:
                ex.client_disconnected = True
                ex.cut = "client"
            except asyncio.CancelledError:
                if not self.cutting or task is None:
                    raise
                task.uncancel()
                ex.cut = "drain"
                err = _drain_error()
            except Exception:
                log.exception("unexpected error in stream %s", ex.request_id)
                err = internal_error(ex.request_id)
                ex.cut = "refused"
        finally:
            await _aclose(reply.events)
            if reply.release is not None:
                reply.release()
            if task is not None:
                self.streams.discard(task)
        if err is not None:
            ex.error = err
            ex.status = err.status
        tail: list[bytes] = []
        if err is None and not ex.client_disconnected:
            ex.phase = "response"
            try:
                await self.w.chain.run_response(ex)
                tail = reply.trailer()
            except WardenError as e:
                err = ex.error = e
                ex.status = e.status
            except Exception:
                log.exception("a response hook failed in stream %s", ex.request_id)
                err = ex.error = internal_error(ex.request_id)
                ex.status = 500
        await self._complete(ex)
        try:
            await self._record(ex)
        except AuditUnavailable as e:
            err, tail = e, []
        if err is not None:
            tail = [reply.error_event(err) if reply.error_event is not None else adapter_for(ex.protocol).stream(ex).error(err)]
        if not resp.prepared:
            # Nothing was sent yet: the refusal is a whole answer.
            return self._send(ex, _error_reply(ex, err or internal_error(ex.request_id)))
        if not ex.client_disconnected:
            try:
                for chunk in tail:
                    await resp.write(chunk)
                await resp.write_eof()
            except _CLIENT_GONE:
                ex.client_disconnected = True
        return resp

    def cut_streams(self) -> int:
        """The drain deadline: every open stream ends now with an error event, every request still
        waiting for its reply is answered 503 ``server.drain``; new ones are refused at once.  All are recorded."""
        self.cutting = True
        tasks = [*self.streams, *self.waiting]
        for task in tasks:
            task.cancel("warden.drain")
        return len(tasks)

    # -- observe ----------------------------------------------------------------

    def _observe(self, ex: Exchange, resp: web.StreamResponse | None, span: Any) -> None:
        """Metrics, the request log line and the trace of one finished exchange; never raises."""
        w = self.w
        try:
            total = (ex.ended or time.perf_counter()) - ex.started
            status = ex.status or (resp.status if resp is not None else 500)
            upstream = w.metrics.observe_exchange(ex, status, total)
            err = ex.error
            if err is not None and err.rule:
                w.metrics.refusals.labels(rule=err.rule[:64], status=str(err.status)).inc()
            if w.config.logging.access_log:
                log_ = logging.getLogger("warden.dataplane")
                log_.log(logging.WARNING if status >= 500 else logging.INFO, "request", extra=request_line(ex, status, total, upstream, w.config.logging))
            if span is not None and w.tracing is not None:
                w.tracing.end_exchange(ex, span, status)
        except Exception:
            log.exception("observing request %s failed", ex.request_id)


def _drain_error() -> WardenError:
    return ServiceUnavailable("Warden is shutting down; the stream was cut at the drain deadline", rule="server.drain", headers={"Retry-After": "1"})


async def _aclose(events: AsyncIterator[bytes]) -> None:
    close = getattr(events, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.exception("closing a stream's event source failed")


_QUERY = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=/?%-]*$")


def _raw_query(request: web.Request) -> str:
    """The query as the client encoded it; a query with characters outside RFC 3986's is refused."""
    query = request.raw_path.partition("?")[2]
    if len(query) > 4096 or not _QUERY.match(query):
        raise BadRequest("the query string has characters outside RFC 3986 or is longer than 4096 bytes", rule="request.query")
    return query


def _captured_headers(request: web.Request) -> dict[str, str]:
    """Request headers as recorded: credentials left out, values that are not clean text escaped."""
    out: dict[str, str] = {}
    for k, v in request.headers.items():
        lk = k.lower()
        if lk in _SKIP_HEADERS:
            continue
        out[safe_text(lk, 256)] = safe_text(v, 8192)
    return out


def _offered(body: dict[str, Any] | None) -> frozenset[str] | None:
    """The tool names the model is offered in the body going upstream (``None`` when none are)."""
    if body is None:
        return None
    names: set[str] = set()
    offered = False
    tools = body.get("tools")
    if isinstance(tools, list):
        offered = True
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str):
                names.add(name)
    functions = body.get("functions")
    if isinstance(functions, list):
        offered = True
        for f in functions:
            name = f.get("name") if isinstance(f, dict) else None
            if isinstance(name, str):
                names.add(name)
    return frozenset(names) if offered else None
