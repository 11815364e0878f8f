"""The data plane: the OpenAI-compatible routes the application calls.

Every request: id and trace context, auth, bounded body read, one JSON parse,
the request hooks, then the route's flow.  Every refusal is an OpenAI-format
error, recorded in the audit log before it is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from proxy import chat
from proxy.errors import BadRequest, NotFound, PayloadTooLarge, UpstreamError, UpstreamTimeout, WardenError, error_body, internal_error
from proxy.exchange import Exchange
from proxy.logs import request_line

if TYPE_CHECKING:
    from proxy.app import Warden

log = logging.getLogger("warden.dataplane")
_SKIP_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length", "content-encoding"})
_CHAT = "chat"


def build_data_app(w: Warden) -> web.Application:
    # No middleware on the hot path: unknown paths reach the catch-all route below,
    # and every flow renders its own errors.
    app = web.Application(client_max_size=w.config.server.max_body_bytes)

    def route(name: str, flow: Callable[[Warden, web.Request, Exchange], Awaitable[web.StreamResponse]], parse_json: bool) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await _handle(w, request, name, flow, parse_json)

        return handler

    app.router.add_post("/v1/chat/completions", route(_CHAT, chat.run, True))
    app.router.add_post("/v1/embeddings", route("embeddings", _passthrough, True))
    app.router.add_get("/v1/models", route("models", _passthrough, False))
    for method, path, name, flow, parse in w.extra_data_routes():
        app.router.add_route(method, path, route(name, flow, parse))
    app.router.add_route("*", "/v1/{tail:.*}", route("passthrough", _passthrough, False))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


async def _not_found(request: web.Request) -> web.Response:
    """Paths outside ``/v1``: an OpenAI-format 404, never aiohttp's HTML page."""
    err = NotFound(f"no route for {request.method} {request.path}", rule="server.routes")
    return web.Response(status=404, body=error_body(err), content_type="application/json")


def _parse_chat(ex: Exchange, body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model", rule="request.schema")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a non-empty list of message objects", param="messages", rule="request.schema")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream", rule="request.schema")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", param="tools", rule="request.schema")
    ex.model = model
    ex.stream = bool(stream)


async def _read_body(w: Warden, request: web.Request) -> bytes:
    limit = w.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {limit}", rule="server.max_body_bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes", rule="server.max_body_bytes") from None


async def _handle(
    w: Warden,
    request: web.Request,
    route: str,
    flow: Callable[[Warden, web.Request, Exchange], Awaitable[web.StreamResponse]],
    parse_json: bool,
) -> web.StreamResponse:
    ex = w.new_exchange(request, route)
    span = w.tracing.start_exchange(ex, request) if w.tracing is not None else None
    w.inflight += 1
    w.metrics.inflight.inc()
    resp: web.StreamResponse | None = None
    try:
        try:
            ex.principal = await w.auth.authenticate(request.headers.get("Authorization"))
            ex.request_headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
            if request.can_read_body:
                ex.raw_body = await _read_body(w, request)
            if parse_json:
                try:
                    body = orjson.loads(ex.raw_body)
                except orjson.JSONDecodeError as e:
                    raise BadRequest(f"request body is not valid JSON: {e.msg}", rule="request.json") from None
                if not isinstance(body, dict):
                    raise BadRequest("request body must be a JSON object", rule="request.json")
                ex.body = body
                if route == _CHAT:
                    _parse_chat(ex, body)
                elif isinstance(body.get("model"), str):
                    ex.model = body["model"]
            await w.chain.run_request(ex)
            if ex.local_reply is not None:
                resp = await _local_reply(w, request, ex)
            else:
                resp = await flow(w, request, ex)
        except WardenError as e:
            resp = await _refuse(w, request, ex, e)
    except Exception as e:
        if isinstance(e, ConnectionError) and _client_gone(request):
            ex.client_disconnected = True
            if ex.status is None:
                ex.status = 499
            started = request.get(chat.STARTED)
            resp = started if started is not None else web.Response(status=499)
        else:
            log.exception("unexpected error in request %s", ex.request_id)
            resp = await _refuse(w, request, ex, internal_error(ex.request_id))
    finally:
        try:
            if not ex.recorded:
                try:
                    await w.finish(ex)
                except WardenError:
                    log.error("audit record lost for request %s after the response began", ex.request_id)
            for p in w.chain.complete:
                try:
                    await p.on_complete(ex)
                except Exception:
                    log.exception("plugin %s failed in on_complete", p.name)
            _observe(w, ex, resp, span)
        finally:
            w.inflight -= 1
            w.metrics.inflight.dec()
    return resp


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _refuse(w: Warden, request: web.Request, ex: Exchange, err: WardenError) -> web.StreamResponse:
    """Refuse; once a stream started, end it with an error event instead of a second response."""
    started: web.StreamResponse | None = request.get(chat.STARTED)
    if started is None:
        return await w.refuse(ex, err)
    if err.rule:
        w.metrics.refusals.labels(rule=err.rule[:64], status=str(err.status)).inc()
    try:
        await chat.stream_error(w, ex, started, err)
    except Exception:
        log.exception("could not end the stream of request %s", ex.request_id)
    return started


def _observe(w: Warden, ex: Exchange, resp: web.StreamResponse | None, span: Any = None) -> None:
    """Metrics, the request log line and the trace of one finished exchange; never raises."""
    try:
        total = (ex.ended or time.perf_counter()) - ex.started
        status = ex.status or (resp.status if resp is not None else 500)
        upstream = w.metrics.observe_exchange(ex, status, total)
        if w.config.logging.access_log:
            log.log(logging.WARNING if status >= 500 else logging.INFO, "request", extra=request_line(ex, status, total, upstream, w.config.logging))
        if span is not None and w.tracing is not None:
            w.tracing.end_exchange(ex, span, status)
    except Exception:
        log.exception("observing request %s failed", ex.request_id)


async def _local_reply(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    lr = ex.local_reply
    assert lr is not None
    ex.status = lr.status
    if lr.sse_events is not None and ex.stream:
        await w.finish(ex)
        resp = web.StreamResponse(status=lr.status, headers=w.response_headers(ex, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **lr.headers}))
        await resp.prepare(request)
        chat.mark_started(request, resp)
        for payload in lr.sse_events:
            await resp.write(b"data: " + payload + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    await w.finish(ex)
    return web.Response(status=lr.status, body=lr.body, headers=w.response_headers(ex, {"Content-Type": "application/json", **lr.headers}))


async def _passthrough(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    """Authenticated, audited, not interpreted: relay to the same path upstream."""
    # The path as the client encoded it: decoding would turn %3F, %23 and %2F into
    # a query, a fragment and a path separator on the provider side.
    raw_path = request.raw_path
    path = raw_path[len("/v1") :] if raw_path.startswith("/v1") else raw_path
    body = chat.upstream_body(ex) if ex.body is not None else (ex.raw_body or None)
    headers = w.upstream.build_headers(request.headers, w.upstream_extra_headers(ex))
    if not body:
        headers.pop("content-type", None)
    elif ex.body is None:
        # Relayed as received (multipart uploads, binary bodies): keep the client's type.
        ctype = request.headers.get("Content-Type")
        if ctype is None:
            headers.pop("content-type", None)
        else:
            headers["content-type"] = ctype
    turn, ur = await w.send_turn(ex, request.method, path, body, headers)
    ctype = ur.resp.headers.get("Content-Type", "")
    relay = {k: v for k, v in ur.resp.headers.items() if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("set-cookie")}
    if "text/event-stream" in ctype:
        ex.stream = True
        ex.status = ur.status
        resp = web.StreamResponse(status=ur.status, headers=w.response_headers(ex, relay))
        try:
            await resp.prepare(request)
        except BaseException:
            ur.close()
            raise
        chat.mark_started(request, resp)
        try:
            async for chunk in ur.resp.content.iter_any():
                try:
                    await resp.write(chunk)
                except ConnectionError:
                    ex.client_disconnected = True
                    turn.error = "client disconnected"
                    return resp
        except (TimeoutError, aiohttp.ServerTimeoutError):
            # Not a clean end of stream: the client must not take a truncated stream for a whole one.
            turn.error = "timeout"
            w.metrics.upstream_errors.labels(kind="timeout").inc()
            await chat.stream_error(w, ex, resp, UpstreamTimeout("the provider stream stalled", rule="upstream.timeout_s"))
            return resp
        except aiohttp.ClientError as e:
            turn.error = type(e).__name__
            w.metrics.upstream_errors.labels(kind="connection").inc()
            await chat.stream_error(w, ex, resp, UpstreamError("the provider stream broke off", rule="upstream.base_url"))
            return resp
        finally:
            turn.duration_s = time.perf_counter() - turn.started
            ur.close()
        await w.finish(ex)
        try:
            await resp.write_eof()
        except ConnectionError:
            ex.client_disconnected = True
        return resp
    try:
        raw = await w.upstream.read_body(ur, w.config.upstream.max_response_bytes)
    finally:
        turn.duration_s = time.perf_counter() - turn.started
    ex.status = ur.status
    if "json" in ctype:
        try:
            ex.response_body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            ex.response_body = None
        if isinstance(ex.response_body, dict):
            usage = ex.response_body.get("usage")
            if isinstance(usage, dict):
                chat.add_usage(ex, usage)
    await w.chain.run_response(ex)
    await w.finish(ex)
    return web.Response(status=ur.status, body=raw, headers=w.response_headers(ex, relay))
