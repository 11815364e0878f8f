"""The data plane: one catch-all handler into the pipeline, and the flows it routes to.

Routing is the pipeline's (an allow-list over canonical paths, see
:mod:`proxy.routes`); aiohttp's router only hands every request to it.
Flows return replies; none of them sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web

from llm_warden.proxy import chat
from llm_warden.proxy.errors import NotFound, ServiceUnavailable, UpstreamError, UpstreamTimeout
from llm_warden.proxy.exchange import Exchange
from llm_warden.proxy.mcp import flow as mcp_flow
from llm_warden.proxy.pipeline import Flow, Incoming, JsonReply, Reply, StreamReply, provider_error_reply

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden

log = logging.getLogger("warden.dataplane")
OPENAI_ONLY_ROUTES = frozenset({"embeddings", "models"})
"""Relay routes whose answer the application reads in the OpenAI format: refused when the provider speaks another API."""
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length", "content-encoding"})


def build_data_app(w: Warden) -> web.Application:
    app = web.Application(client_max_size=w.config.server.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", w.pipeline.handle)
    return app


async def relay(w: Warden, req: Incoming, ex: Exchange) -> Reply:
    """Authenticated, limited, audited, not interpreted: relay to the provider path built from the matched route."""
    if req.match.route.name in OPENAI_ONLY_ROUTES and w.upstream.dialect.name != "openai":
        raise NotFound(f"the provider speaks the {w.upstream.dialect.name} API, which has no OpenAI-format {req.match.route.name} endpoint", rule="upstream.api")
    path = req.match.route.upstream_path(req.match.params)
    if req.query_string:
        path += "?" + req.query_string
    body = chat.upstream_body(ex) if ex.body is not None else (ex.raw_body or None)
    headers = w.upstream.build_headers(req.headers, w.upstream_extra_headers(ex))
    if not body:
        headers.pop("content-type", None)
    elif ex.body is None:
        # Relayed as received (multipart uploads, binary bodies): keep the client's type.
        if req.content_type is None:
            headers.pop("content-type", None)
        else:
            headers["content-type"] = req.content_type
    turn, ur = await w.send_turn(ex, req.match.route.method, path, body, headers, payload=ex.body)
    ctype = ur.resp.headers.get("Content-Type", "")
    relayed = {k: v for k, v in ur.resp.headers.items() if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("set-cookie")}
    if "text/event-stream" in ctype:
        ex.stream = True

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in ur.resp.content.iter_any():
                    yield chunk
            except (TimeoutError, aiohttp.ServerTimeoutError):
                turn.error, turn.error_kind = "timeout", "timeout"
                raise UpstreamTimeout("the provider stream stalled", rule="upstream.timeout_s") from None
            except aiohttp.ClientError as e:
                turn.error, turn.error_kind = type(e).__name__, "connection"
                raise UpstreamError("the provider stream broke off", rule="upstream.base_url") from None
            finally:
                turn.duration_s = time.perf_counter() - turn.started
                ur.close()

        return StreamReply(ur.status, relayed, events(), release=ur.close)
    try:
        raw = await w.upstream.read_body(ur, w.config.upstream.max_response_bytes)
    except UpstreamError as e:
        turn.error, turn.error_kind = e.message, "timeout" if e.status == 504 else "connection"
        raise
    finally:
        turn.duration_s = time.perf_counter() - turn.started
    if ur.status >= 400:
        return provider_error_reply(ex, turn, ur, raw)
    if "json" in ctype:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        turn.response = ex.response_body = parsed
        if isinstance(parsed, dict):
            ex.add_usage(parsed.get("usage"))
            if isinstance(parsed.get("model"), str):
                ex.response_model = parsed["model"]
    return JsonReply(ur.status, raw, relayed)


async def feedback(w: Warden, req: Incoming, ex: Exchange) -> Reply:
    """``POST /v1/feedback``: the authenticated principal's verdict on one of its tenant's exchanges."""
    from llm_warden.proxy.audit.feedback import submit_feedback

    if w.audit is None:
        raise ServiceUnavailable("feedback needs the audit log, which is disabled", rule="audit.enabled")
    assert ex.principal is not None and ex.body is not None
    result = await submit_feedback(w.audit, ex.principal, ex.body)
    ex.response_body = result
    return JsonReply(200, orjson.dumps(result))


async def count_tokens(w: Warden, req: Incoming, ex: Exchange) -> Reply:
    """``POST /v1/messages/count_tokens`` (routed only over an Anthropic provider): the governed body, counted by the provider."""
    from llm_warden.proxy.upstream_anthropic import COUNT_TOKENS_PATH, check_count, count_tokens_request, openai_error

    assert ex.body is not None
    body = orjson.dumps(count_tokens_request(ex.body))
    headers = w.upstream.build_headers(req.headers, w.upstream_extra_headers(ex))
    turn, ur = await w.send_turn(ex, "POST", COUNT_TOKENS_PATH, body, headers, payload=ex.body)
    raw = await chat.read_turn(w, turn, ur, 1024 * 1024)
    if ur.status >= 400:
        return provider_error_reply(ex, turn, ur, openai_error(raw))
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    why = "status is not 200" if ur.status != 200 else check_count(parsed)
    if why is not None:
        turn.error, turn.error_kind = f"malformed answer from provider: {why}", "malformed"
        raise UpstreamError(f"the provider returned an answer Warden cannot accept: {why}", rule="upstream.protocol")
    assert isinstance(parsed, dict)
    turn.response = ex.response_body = {"input_tokens": parsed["input_tokens"]}
    # Counting generates nothing and is not billed: a token budget's reservation is given back.
    ex.add_usage({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    return JsonReply(200, orjson.dumps(ex.response_body), ur.relay_headers())


FLOWS: dict[str, Flow] = {"chat": chat.run, "relay": relay, "feedback": feedback, "count_tokens": count_tokens, "mcp": mcp_flow.run}
