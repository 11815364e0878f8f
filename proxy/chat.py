"""``POST /v1/chat/completions``: non-streamed and streamed, with corrective turns.

Streaming is relayed event by event (time to first token preserved); only
tool-call deltas are held, assembled and judged before they are shown.  When
no plugin judges tool calls and none watches the stream, events are forwarded
as the provider sent them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from proxy import sse, tooling
from proxy.errors import BadRequest, UpstreamError, UpstreamTimeout, WardenError
from proxy.exchange import Exchange, ToolCall, UpstreamTurn
from proxy.plugin import StreamEvent

if TYPE_CHECKING:
    from proxy.app import Warden

PATH = "/chat/completions"
_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, ConnectionError)
STARTED = web.RequestKey("warden.started", web.StreamResponse)
"""Request key of the response whose status line was already sent (a stream)."""


def mark_started(request: web.Request, resp: web.StreamResponse) -> None:
    """Record that ``resp`` is prepared: a later error must end it, not start another response."""
    request[STARTED] = resp


def add_usage(ex: Exchange, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    if ex.usage is None:
        ex.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = usage.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            ex.usage[k] += v


def upstream_body(ex: Exchange) -> bytes:
    """The bytes to send: the original body unless a plugin changed it."""
    if ex.body_modified:
        return orjson.dumps(ex.body)
    return ex.raw_body


async def run(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    assert ex.body is not None
    if w.chain.tool:
        _single_choice(ex.body)
    if ex.stream:
        if w.config.upstream.stream_usage:
            opts = ex.body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                ex.annotations["client_usage"] = False
                new = dict(ex.body)
                new["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                ex.set_body(new)
        return await _stream(w, request, ex)
    return await _non_stream(w, request, ex)


def _single_choice(body: dict[str, Any]) -> None:
    """Tool calls are judged in one choice: refuse ``n`` > 1 when tools are offered."""
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1 and (body.get("tools") or body.get("functions")):
        raise BadRequest("'n' must be 1 when tools are offered: Warden judges the tool calls of a single choice", param="n", rule="tools.single_choice")


def _unjudgeable(choices: list[Any]) -> str | None:
    """Why a non-streamed answer's tool calls cannot all be judged (None when they can)."""
    for i, ch in enumerate(choices):
        message = ch.get("message") if isinstance(ch, dict) else None
        if not isinstance(message, dict):
            continue
        if i > 0 and (message.get("tool_calls") or message.get("function_call")):
            return "tool calls in more than one choice"
        tcs = message.get("tool_calls")
        if tcs is not None and not isinstance(tcs, list):
            return "tool_calls is not a list"
    return None


async def _call(w: Warden, request: web.Request, ex: Exchange, body: bytes, reason: str) -> tuple[UpstreamTurn, Any]:
    headers = w.upstream.build_headers(request.headers, w.upstream_extra_headers(ex))
    return await w.send_turn(ex, "POST", PATH, body, headers, reason)


async def _non_stream(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    assert ex.body is not None
    body_bytes = upstream_body(ex)
    body = ex.body
    judging = bool(w.chain.tool)
    limit = tooling.max_corrections(ex)
    while True:
        reason = "initial" if not ex.turns else "correction"
        turn, ur = await _call(w, request, ex, body_bytes, reason)
        try:
            raw = await w.upstream.read_body(ur, w.config.upstream.max_response_bytes)
        except WardenError as e:
            turn.error = e.message
            w.count_upstream_error(e)
            raise
        finally:
            turn.duration_s = time.perf_counter() - turn.started
        if ur.status != 200:
            turn.error = f"provider status {ur.status}"
            w.metrics.upstream_errors.labels(kind=f"status_{ur.status // 100}xx").inc()
            return await w.relay_upstream_error(ex, ur, raw)
        try:
            resp = orjson.loads(raw)
        except orjson.JSONDecodeError:
            resp = None
        if not isinstance(resp, dict):
            turn.error = "malformed JSON from provider"
            w.metrics.upstream_errors.labels(kind="malformed").inc()
            raise UpstreamError("the provider returned a malformed answer", rule="upstream.protocol")
        turn.response = resp
        add_usage(ex, resp.get("usage"))
        if isinstance(resp.get("model"), str):
            ex.response_model = resp["model"]
        raw_choices = resp.get("choices")
        choices: list[Any] = raw_choices if isinstance(raw_choices, list) else []
        first: dict[str, Any] = choices[0] if choices and isinstance(choices[0], dict) else {}
        raw_message = first.get("message")
        message: dict[str, Any] = raw_message if isinstance(raw_message, dict) else {}
        if judging:
            why = _unjudgeable(choices)
            if why is not None:
                turn.error = f"malformed answer from provider: {why}"
                w.metrics.upstream_errors.labels(kind="malformed").inc()
                raise UpstreamError(f"the provider returned an answer Warden cannot judge: {why}", rule="upstream.protocol")
        calls = tooling.calls_from_message(message) if judging else []
        if calls:
            decisions = await tooling.judge(w.chain, ex, calls, len(ex.turns) - 1)
            refused = [d for d in decisions if d.kind != "allow"]
            if refused:
                corrections = len(ex.turns) - 1
                if corrections >= limit:
                    raise tooling.exhausted_error(calls, decisions, corrections)
                for d in refused:
                    w.metrics.corrective_turns.labels(reason=d.kind).inc()
                content = message.get("content") if isinstance(message.get("content"), str) else None
                body = tooling.corrective_body(body, content, calls, decisions)
                body_bytes = orjson.dumps(body)
                continue
        break
    ex.finish_reasons = [str(c.get("finish_reason")) for c in choices if isinstance(c, dict)]
    content = message.get("content")
    ex.response_text = content if isinstance(content, str) else None
    if len(ex.turns) > 1 and ex.usage is not None:
        resp["usage"] = dict(ex.usage)
        ex.response_modified = True
    ex.response_body = resp
    ex.status = 200
    await w.chain.run_response(ex)
    out = orjson.dumps(ex.response_body) if ex.response_modified else raw
    transport = request.transport
    if transport is None or transport.is_closing():
        ex.client_disconnected = True
    await w.finish(ex)
    return web.Response(body=out, status=200, headers=w.response_headers(ex, {"Content-Type": "application/json", **ur.relay_headers()}))


class _StreamState:
    """What the relay learned from the events of the current turn."""

    __slots__ = ("calls", "held_finish", "text", "last", "finish_reason", "usage_chunk", "role_sent")

    def __init__(self) -> None:
        self.calls = tooling.StreamedCalls()
        self.held_finish: dict[str, Any] | None = None
        self.text: list[str] = []
        self.last: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.usage_chunk: dict[str, Any] | None = None
        self.role_sent = False


async def _stream(w: Warden, request: web.Request, ex: Exchange) -> web.StreamResponse:
    assert ex.body is not None
    body = ex.body
    body_bytes = upstream_body(ex)
    judging = bool(w.chain.tool)
    watching = bool(w.chain.stream)
    limit = tooling.max_corrections(ex)
    client_usage = ex.annotations.get("client_usage", True) is not False
    resp: web.StreamResponse | None = None
    all_text: list[str] = []
    last_usage_chunk: dict[str, Any] | None = None
    final_calls: list[ToolCall] = []
    model_seen: str | None = None
    chunk_id: str | None = None
    created: int | None = None

    async def write(data: bytes) -> None:
        assert resp is not None
        try:
            await resp.write(data)
        except _CLIENT_GONE:
            ex.client_disconnected = True
            raise

    while True:
        reason = "initial" if not ex.turns else "correction"
        try:
            turn, ur = await _call(w, request, ex, body_bytes, reason)
        except WardenError as e:
            if resp is None:
                raise
            await stream_error(w, ex, resp, e)
            return resp
        if ur.status != 200:
            try:
                raw = await w.upstream.read_body(ur, 1024 * 1024)
            except WardenError:
                raw = b""
            turn.duration_s = time.perf_counter() - turn.started
            turn.error = f"provider status {ur.status}"
            w.metrics.upstream_errors.labels(kind=f"status_{ur.status // 100}xx").inc()
            if resp is None:
                return await w.relay_upstream_error(ex, ur, raw)
            await stream_error(w, ex, resp, UpstreamError(f"the provider answered {ur.status} during a corrective turn", rule="upstream.status"))
            return resp
        if resp is None:
            resp = web.StreamResponse(
                status=200, headers=w.response_headers(ex, {**ur.relay_headers(), "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            )
            ex.status = 200
            try:
                await resp.prepare(request)
            except BaseException:
                ur.close()
                raise
            mark_started(request, resp)
        st = _StreamState()
        parser = sse.SSEParser()
        done = False
        try:
            try:
                async for chunk in ur.resp.content.iter_any():
                    for ev in parser.feed(chunk):
                        if await _relay_event(w, ex, ev, st, judging, watching, write, turn):
                            done = True
                            break
                    if done:
                        break
                if not done:
                    for ev in parser.close():
                        if await _relay_event(w, ex, ev, st, judging, watching, write, turn):
                            done = True
            finally:
                turn.duration_s = time.perf_counter() - turn.started
                ur.close()
        except _CLIENT_GONE:
            ex.client_disconnected = True
            turn.error = "client disconnected"
            _collect(ex, all_text, st)
            return resp
        except sse.SSEError as e:
            turn.error = str(e)
            w.metrics.upstream_errors.labels(kind="malformed").inc()
            await stream_error(w, ex, resp, UpstreamError("the provider sent a malformed stream", rule="upstream.protocol"))
            return resp
        except _UpstreamStreamError as e:
            turn.error = str(e.err.message)
            await stream_error(w, ex, resp, e.err)
            return resp
        except (TimeoutError, aiohttp.ServerTimeoutError):
            turn.error = "timeout"
            w.metrics.upstream_errors.labels(kind="timeout").inc()
            await stream_error(w, ex, resp, UpstreamTimeout("the provider stream stalled", rule="upstream.timeout_s"))
            return resp
        except aiohttp.ClientError as e:
            turn.error = type(e).__name__
            w.metrics.upstream_errors.labels(kind="connection").inc()
            await stream_error(w, ex, resp, UpstreamError("the provider stream broke off", rule="upstream.base_url"))
            return resp
        if st.last is not None:
            model_seen = st.last.get("model") or model_seen
            chunk_id = st.last.get("id") or chunk_id
            created = st.last.get("created") or created
        if st.usage_chunk is not None:
            last_usage_chunk = st.usage_chunk
        if not done and st.finish_reason is None:
            turn.error = "stream ended early"
            w.metrics.upstream_errors.labels(kind="truncated").inc()
            _collect(ex, all_text, st)
            await stream_error(w, ex, resp, UpstreamError("the provider stream ended before the answer was complete", rule="upstream.protocol"))
            return resp
        if st.calls:
            calls = st.calls.calls()
            decisions = await tooling.judge(w.chain, ex, calls, len(ex.turns) - 1)
            if any(d.kind != "allow" for d in decisions):
                corrections = len(ex.turns) - 1
                if corrections >= limit:
                    _collect(ex, all_text, st)
                    await stream_error(w, ex, resp, tooling.exhausted_error(calls, decisions, corrections))
                    return resp
                for d in decisions:
                    if d.kind != "allow":
                        w.metrics.corrective_turns.labels(reason=d.kind).inc()
                all_text.extend(st.text)
                body = tooling.corrective_body(body, "".join(st.text), calls, decisions)
                body_bytes = orjson.dumps(body)
                continue
            final_calls = calls
            base = st.held_finish or st.last or {}
            out = {
                "id": base.get("id", chunk_id),
                "object": "chat.completion.chunk",
                "created": base.get("created", created),
                "model": base.get("model", model_seen),
                "choices": [{"index": 0, "delta": tooling.call_delta(calls), "finish_reason": None}],
            }
            try:
                await write(sse.encode_json(out))
                if st.held_finish is not None:
                    await write(sse.encode_json(st.held_finish))
            except _CLIENT_GONE:
                _collect(ex, all_text, st)
                return resp
        _collect(ex, all_text, st)
        break
    ex.response_text = "".join(all_text)
    ex.response_body = _assembled(ex, chunk_id, created, model_seen, final_calls)
    try:
        await w.chain.run_response(ex)
        if last_usage_chunk is not None and client_usage:
            usage_out = dict(last_usage_chunk)
            if ex.usage is not None:
                usage_out["usage"] = dict(ex.usage)
            await write(sse.encode_json(usage_out))
        await w.finish(ex)
        await write(sse.DONE_EVENT)
        await resp.write_eof()
    except _CLIENT_GONE:
        pass
    except WardenError as e:
        await stream_error(w, ex, resp, e)
    return resp


class _UpstreamStreamError(Exception):
    def __init__(self, err: WardenError) -> None:
        self.err = err


async def _relay_event(w: Warden, ex: Exchange, ev: sse.RawEvent, st: _StreamState, judging: bool, watching: bool, write: Any, turn: UpstreamTurn) -> bool:
    """Relay one upstream event; returns True on ``[DONE]``."""
    data = ev.data
    if data is None:
        if ev.raw.startswith(b":"):
            await write(ev.raw)  # a keep-alive comment: relayed, so idle clients do not give up before the first token
        return False
    if data == sse.DONE:
        return True
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise sse.SSEError("an upstream event is not JSON") from None
    if not isinstance(obj, dict):
        raise sse.SSEError("an upstream event is not a JSON object")
    if "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        msg = str(err.get("message", "provider error"))[:500]
        w.metrics.upstream_errors.labels(kind="stream_error").inc()
        raise _UpstreamStreamError(UpstreamError(f"the provider reported an error mid-stream: {msg}", rule="upstream.stream"))
    st.last = obj
    modified = False
    usage = obj.get("usage")
    choices = obj.get("choices")
    if usage:
        add_usage(ex, usage)
        if not choices:
            st.usage_chunk = obj
            return False
    if isinstance(obj.get("model"), str):
        ex.response_model = obj["model"]
    if isinstance(choices, list):
        visible = False
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            fr = ch.get("finish_reason")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and ch.get("index", 0) == 0:
                    st.text.append(content)
                if judging and (delta.get("tool_calls") or delta.get("function_call")) and ch.get("index", 0) != 0:
                    w.metrics.upstream_errors.labels(kind="malformed").inc()
                    raise _UpstreamStreamError(UpstreamError("the provider streamed tool calls in more than one choice", rule="upstream.protocol"))
                if judging and ("tool_calls" in delta or "function_call" in delta) and ch.get("index", 0) == 0:
                    tcs = delta.get("tool_calls")
                    if isinstance(tcs, list):
                        st.calls.add(tcs)
                    if "function_call" in delta:
                        st.calls.add_legacy(delta["function_call"])
                    delta = {k: v for k, v in delta.items() if k not in ("tool_calls", "function_call")}
                    ch["delta"] = delta
                    modified = True
                if delta and (delta.keys() - {"role"} or not st.role_sent):
                    visible = True
                    if "role" in delta:
                        st.role_sent = True
            if fr is not None:
                if ch.get("index", 0) == 0:
                    st.finish_reason = str(fr)
                    ex.finish_reasons = [str(fr)]
                if judging and st.calls and ch.get("index", 0) == 0:
                    st.held_finish = obj
                    return False
                visible = True
        if modified and not visible:
            return False
    if "ttft" not in ex.timings:
        now = time.perf_counter()
        ex.timings["ttft"] = now - ex.started
        turn.ttft_s = now - turn.started
    if watching:
        event = StreamEvent(raw=ev.raw, data=obj, modified=modified)
        await w.chain.run_stream_event(ex, event)
        if event.drop:
            return False
        modified = event.modified
    await write(sse.encode_json(obj) if modified else ev.raw)
    return False


def _collect(ex: Exchange, all_text: list[str], st: _StreamState) -> None:
    all_text.extend(st.text)
    st.text = []
    ex.response_text = "".join(all_text)


def _assembled(ex: Exchange, chunk_id: Any, created: Any, model: Any, calls: list[ToolCall]) -> dict[str, Any]:
    """The streamed answer as one chat.completion (for the audit log, idempotent replay, citations)."""
    message: dict[str, Any] = {"role": "assistant", "content": ex.response_text or None}
    if calls:
        message.update({k: v for k, v in tooling.assistant_message(None, calls).items() if k in ("tool_calls", "function_call")})
    return {
        "id": chunk_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": ex.finish_reasons[0] if ex.finish_reasons else None}],
        "usage": ex.usage,
    }


async def stream_error(w: Warden, ex: Exchange, resp: web.StreamResponse, err: WardenError) -> None:
    """End a started stream with an OpenAI-format error event (the status line is already sent)."""
    ex.error = err
    ex.status = err.status
    if ex.client_disconnected:
        return
    try:
        await w.finish(ex)
    except WardenError as audit_err:
        err = audit_err
    try:
        await resp.write(sse.encode_json(err.to_dict()))
        await resp.write_eof()
    except _CLIENT_GONE:
        ex.client_disconnected = True
