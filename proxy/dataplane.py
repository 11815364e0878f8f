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

import orjson
from aiohttp import web

from proxy import chat
from proxy.errors import BadRequest, NotFound, PayloadTooLarge, WardenError, error_body, internal_error
from proxy.exchange import Exchange

if TYPE_CHECKING:
    from proxy.app import Warden

log = logging.getLogger("warden.dataplane")
_SKIP_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length", "content-encoding"})
_CHAT = "chat"


def build_data_app(w: Warden) -> web.Application:
    app = web.Application(middlewares=[_errors_middleware], client_max_size=w.config.server.max_body_bytes)

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
    return app


@web.middleware
async def _errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Unknown routes and framework errors as OpenAI-format bodies; never a stack trace."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status == 404:
            err: WardenError = NotFound(f"no route for {request.method} {request.path}", rule="server.routes")
        elif e.status == 405:
            err = WardenError(f"method {request.method} is not allowed on {request.path}", status=405, code="method_not_allowed", rule="server.routes")
        elif e.status == 413:
            err = PayloadTooLarge("request body too large", rule="server.max_body_bytes")
        else:
            err = WardenError(e.reason or "request refused", status=e.status, code="http_error")
        return web.Response(status=err.status, body=error_body(err), content_type="application/json")


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
            resp = await w.refuse(ex, e)
    except Exception:
        log.exception("unexpected error in request %s", ex.request_id)
        resp = await w.refuse(ex, internal_error(ex.request_id))
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
            _observe(w, ex, resp)
        finally:
            w.inflight -= 1
            w.metrics.inflight.dec()
    return resp


def _observe(w: Warden, ex: Exchange, resp: web.StreamResponse | None) -> None:
    m = w.metrics
    end = ex.ended or time.perf_counter()
    total = end - ex.started
    status = ex.status or (resp.status if resp is not None else 500)
    model = m.model_label(ex.model)
    requests, duration, overhead = m.request_children(ex.route, model, f"{status // 100}xx", ex.stream)
    requests.inc()
    duration.observe(total)
    upstream = 0.0
    for t in ex.turns:
        if t.duration_s is not None:
            upstream += t.duration_s
            m.upstream_duration.labels(route=ex.route, model=model).observe(t.duration_s)
    if ex.stream:
        # In a stream the client's own reading pace is part of the total; count Warden's time to first byte instead.
        ttft = ex.timings.get("ttft")
        if ttft is not None:
            m.ttft.labels(model=model).observe(ttft)
            first = ex.turns[0].ttft_s if ex.turns and ex.turns[0].ttft_s is not None else ttft
            overhead.observe(max(ttft - first, 0.0))
    else:
        overhead.observe(max(total - upstream, 0.0))
    if ex.usage:
        for kind, key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            v = ex.usage.get(key)
            if isinstance(v, int) and v > 0:
                m.tokens.labels(model=model, type=kind).inc(v)
    if w.config.logging.access_log:
        p = ex.principal
        log.info(
            "request",
            extra={
                "request_id": ex.request_id,
                "trace_id": ex.trace_id,
                "tenant": p.tenant if p else None,
                "route": ex.route,
                "model": ex.model,
                "status": status,
                "latency_ms": round(total * 1000, 3),
                "upstream_ms": round(upstream * 1000, 3),
                "turns": len(ex.turns),
                "stream": ex.stream,
                "rule": ex.error.rule if ex.error else None,
                "decisions": [f"{d.call.name}={d.decision.kind}" for d in ex.tool_decisions] or None,
            },
        )


async def _local_reply(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    lr = ex.local_reply
    assert lr is not None
    ex.status = lr.status
    if lr.sse_events is not None and ex.stream:
        await w.finish(ex)
        resp = web.StreamResponse(status=lr.status, headers=w.response_headers(ex, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **lr.headers}))
        await resp.prepare(request)
        for payload in lr.sse_events:
            await resp.write(b"data: " + payload + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    await w.finish(ex)
    return web.Response(status=lr.status, body=lr.body, headers=w.response_headers(ex, {"Content-Type": "application/json", **lr.headers}))


async def _passthrough(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    """Authenticated, audited, not interpreted: relay to the same path upstream."""
    path = request.path[len("/v1") :] if request.path.startswith("/v1") else request.path
    if request.query_string:
        path += "?" + request.query_string
    body = chat.upstream_body(ex) if ex.body is not None else (ex.raw_body or None)
    from proxy.exchange import UpstreamTurn

    turn = UpstreamTurn(index=0, body=body or b"", started=time.perf_counter())
    ex.turns.append(turn)
    headers = w.upstream.build_headers(request.headers, w.upstream_extra_headers(ex))
    if not body:
        headers.pop("Content-Type", None)
    try:
        ur = await w.upstream.send(request.method, path, body, headers)
    except WardenError as e:
        turn.error = e.message
        turn.duration_s = time.perf_counter() - turn.started
        w.count_upstream_error(e)
        raise
    turn.status = ur.status
    ctype = ur.resp.headers.get("Content-Type", "")
    relay = {k: v for k, v in ur.resp.headers.items() if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("set-cookie")}
    if "text/event-stream" in ctype:
        ex.stream = True
        ex.status = ur.status
        resp = web.StreamResponse(status=ur.status, headers=w.response_headers(ex, relay))
        await resp.prepare(request)
        try:
            async for chunk in ur.resp.content.iter_any():
                await resp.write(chunk)
        except (ConnectionError, Exception) as e:
            turn.error = type(e).__name__
            ex.client_disconnected = isinstance(e, ConnectionError)
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
