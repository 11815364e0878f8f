"""The chat flow (``POST /v1/chat/completions``, ``/v1/messages``, ``/v1/responses``): non-streamed and streamed, with corrective turns.

The flow works on the internal representation (the OpenAI chat shape) whatever
API the client speaks: the route's protocol adapter translated the request
before the flow runs and renders the answer after it; stream events are
rendered by the adapter's :class:`~proxy.protocols.base.StreamRenderer` as
they are relayed.  A flow returns a reply; the pipeline sends it.  Streaming is relayed event
by event (time to first token preserved); only tool-call deltas are held,
assembled and judged before they are shown — always, so the core's offer
check holds whether or not a tool plugin is enabled.  Events without tool
calls that no plugin watches are forwarded as the provider sent them.  Provider answers that do not match the wire format are refused
(502, rule ``upstream.protocol``) before anything of them is relayed.

The provider's API is the upstream's dialect (``[upstream] api``, :class:`proxy.upstream.Dialect`):
each turn's internal body is encoded for it, and its answers and stream events are checked against
its wire and decoded into the internal shape before the flow sees them (an Anthropic provider:
:mod:`proxy.upstream_anthropic`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from llm_warden.proxy import sse, tooling, wire
from llm_warden.proxy.errors import BadRequest, UpstreamError, UpstreamTimeout, WardenError
from llm_warden.proxy.exchange import Exchange, ToolCall, UpstreamTurn
from llm_warden.proxy.headers import safe_text
from llm_warden.proxy.jsonbounds import depth_exceeds
from llm_warden.proxy.pipeline import Incoming, JsonReply, Reply, StreamReply, provider_error_reply
from llm_warden.proxy.plugin import StreamEvent
from llm_warden.proxy.protocols import adapter_for
from llm_warden.proxy.upstream_anthropic_answer import ProviderStreamError

if TYPE_CHECKING:
    from llm_warden.proxy.app import Warden
    from llm_warden.proxy.upstream import StreamTranslator, UpstreamResponse

MAX_ANSWER_DEPTH = 128
"""Deepest nesting a provider answer may have (a chat completion nests about six levels)."""


def _exact(raw: bytes) -> bytes:
    """``raw`` in a buffer of its own size.  orjson's output keeps the capacity it grew to (a 34 KB body
    sits in ~460 KiB); a body held for a whole stream would hold that much (bench/stream_memory.py)."""
    return bytes(memoryview(raw))


def upstream_body(ex: Exchange) -> bytes:
    """The bytes to send: the original body unless a plugin changed it."""
    if ex.body_modified:
        return _exact(orjson.dumps(ex.body))
    return ex.raw_body


async def run(w: Warden, req: Incoming, ex: Exchange) -> Reply:
    assert ex.body is not None
    _single_choice(ex.body)
    if ex.stream:
        client_usage = True
        if w.config.upstream.stream_usage:
            opts = ex.body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                client_usage = False
                new = dict(ex.body)
                new["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
                ex.set_body(new)
        return await _ChatStream(w, req, ex, client_usage).start()
    return await _non_stream(w, req, ex)


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
    return None


def _malformed(turn: UpstreamTurn, why: str) -> UpstreamError:
    turn.error = f"malformed answer from provider: {why}"
    turn.error_kind = "malformed"
    return UpstreamError(f"the provider returned an answer Warden cannot accept: {why}", rule="upstream.protocol")


async def _call(w: Warden, req: Incoming, ex: Exchange, body: bytes, reason: str, payload: Any) -> tuple[UpstreamTurn, UpstreamResponse]:
    """One upstream turn in the provider's API (``[upstream] api``); the turn records the internal body as its payload."""
    dialect = w.upstream.dialect
    body = dialect.encode(payload, body)
    headers = w.upstream.build_headers(req.headers, w.upstream_extra_headers(ex))
    return await w.send_turn(ex, "POST", dialect.path, body, headers, reason, payload)


def _provider_error(w: Warden, ex: Exchange, turn: UpstreamTurn, ur: UpstreamResponse, raw: bytes) -> Reply:
    return provider_error_reply(ex, turn, ur, w.upstream.dialect.error_body(raw))


async def read_turn(w: Warden, turn: UpstreamTurn, ur: UpstreamResponse, limit: int) -> bytes:
    """A whole (non-streamed) upstream answer, bounded; a failure is kept on the turn."""
    try:
        return await w.upstream.read_body(ur, limit)
    except WardenError as e:
        turn.error = e.message
        turn.error_kind = "timeout" if e.status == 504 else "connection"
        raise
    finally:
        turn.duration_s = time.perf_counter() - turn.started


async def _non_stream(w: Warden, req: Incoming, ex: Exchange) -> Reply:
    assert ex.body is not None
    body_bytes = upstream_body(ex)
    body = ex.body
    limit = ex.max_corrections
    while True:
        reason = "initial" if not ex.turns else "correction"
        turn, ur = await _call(w, req, ex, body_bytes, reason, body)
        raw = await read_turn(w, turn, ur, w.config.upstream.max_response_bytes)
        if ur.status >= 400:
            return _provider_error(w, ex, turn, ur, raw)
        if ur.status != 200:
            raise _malformed(turn, f"status {ur.status} where a chat completion answers 200")
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _malformed(turn, "the answer is not JSON") from None
        if depth_exceeds(parsed, raw, MAX_ANSWER_DEPTH):
            raise _malformed(turn, f"the answer nests deeper than {MAX_ANSWER_DEPTH} levels")
        resp, why = w.upstream.dialect.answer(parsed)
        if resp is None:
            raise _malformed(turn, why or "the answer is malformed")
        if resp is not parsed:
            # Translated from the provider's API: what is relayed is the internal answer.
            raw = orjson.dumps(resp)
            ex.response_modified = True
        turn.response = resp
        ex.add_usage(resp.get("usage"))
        if isinstance(resp.get("model"), str):
            ex.response_model = resp["model"]
        choices: list[Any] = resp.get("choices") or []
        first: dict[str, Any] = choices[0] if choices else {}
        message: dict[str, Any] = first.get("message") or {}
        why = _unjudgeable(choices)
        if why is not None:
            raise _malformed(turn, why)
        calls = tooling.calls_from_message(message)
        if calls:
            decisions = await tooling.judge(w.chain, ex, calls, len(ex.turns) - 1, object_arguments=adapter_for(ex.protocol).object_arguments)
            refused = [d for d in decisions if d.kind != "allow"]
            if refused:
                corrections = len(ex.turns) - 1
                if corrections >= limit:
                    raise tooling.exhausted_error(calls, decisions, corrections)
                for d in refused:
                    w.metrics.corrective_turns.labels(reason=d.kind).inc()
                content = message.get("content") if isinstance(message.get("content"), str) else None
                body = tooling.corrective_body(body, content, calls, decisions)
                body_bytes = _exact(orjson.dumps(body))
                continue
        break
    ex.finish_reasons = [str(c.get("finish_reason")) for c in choices]
    content = message.get("content")
    ex.response_text = content if isinstance(content, str) else None
    if len(ex.turns) > 1 and ex.usage is not None:
        # A new dict: the last turn keeps the provider's own answer (its usage) for the record and the trace.
        resp = {**resp, "usage": ex.usage.as_dict()}
        ex.response_modified = True
    ex.response_body = resp
    return JsonReply(200, raw, ur.relay_headers())


class _TurnState:
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


class _ChatStream:
    """One streamed chat exchange: the first upstream turn, then an event source for the pipeline to send."""

    def __init__(self, w: Warden, req: Incoming, ex: Exchange, client_usage: bool) -> None:
        self.w = w
        self.req = req
        self.ex = ex
        self.client_usage = client_usage
        adapter = adapter_for(ex.protocol)
        self.render = adapter.stream(ex)
        self.object_arguments = adapter.object_arguments
        self.watching = bool(w.chain.stream)
        self.all_text: list[str] = []
        self.last_usage_chunk: dict[str, Any] | None = None
        self.final_calls: list[ToolCall] = []
        self.model_seen: str | None = None
        self.chunk_id: Any = None
        self.created: Any = None

    async def start(self) -> Reply:
        ex = self.ex
        turn, ur = await _call(self.w, self.req, ex, upstream_body(ex), "initial", ex.body)
        if ur.status != 200:
            raw = await read_turn(self.w, turn, ur, 1024 * 1024)
            if ur.status >= 400:
                return _provider_error(self.w, ex, turn, ur, raw)
            raise _malformed(turn, f"status {ur.status} where a chat completion answers 200")
        headers = {**ur.relay_headers(), "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        self._ur = ur
        return StreamReply(200, headers, self.events(turn, ur), trailer=self.trailer, error_event=self.render.error, release=self._release)

    def _release(self) -> None:
        self._ur.close()

    def trailer(self) -> list[bytes]:
        """What ends the stream in the client's format: the usage it asked for (totals over every turn), then the end."""
        usage = self.ex.usage.as_dict() if self.ex.usage is not None else None
        return self.render.end(self.last_usage_chunk if self.client_usage else None, usage)

    async def events(self, turn: UpstreamTurn, ur: UpstreamResponse) -> AsyncIterator[bytes]:
        ex = self.ex
        assert ex.body is not None
        body = ex.body
        st = _TurnState()
        try:
            while True:
                st = _TurnState()
                async for out in self._relay_turn(turn, ur, st):
                    yield out
                if st.last is not None:
                    self.model_seen = st.last.get("model") or self.model_seen
                    self.chunk_id = st.last.get("id") or self.chunk_id
                    self.created = st.last.get("created") or self.created
                if st.usage_chunk is not None:
                    self.last_usage_chunk = st.usage_chunk
                if st.calls:
                    calls = st.calls.calls()
                    decisions = await tooling.judge(self.w.chain, ex, calls, len(ex.turns) - 1, object_arguments=self.object_arguments)
                    if any(d.kind != "allow" for d in decisions):
                        corrections = len(ex.turns) - 1
                        if corrections >= ex.max_corrections:
                            raise tooling.exhausted_error(calls, decisions, corrections)
                        for d in decisions:
                            if d.kind != "allow":
                                self.w.metrics.corrective_turns.labels(reason=d.kind).inc()
                        turn_text = "".join(st.text)
                        self._collect(st)
                        body = tooling.corrective_body(body, turn_text, calls, decisions)
                        turn, ur = await _call(self.w, self.req, ex, _exact(orjson.dumps(body)), "correction", body)
                        self._ur = ur
                        if ur.status != 200:
                            await read_turn(self.w, turn, ur, 1024 * 1024)
                            turn.error = f"provider status {ur.status}"
                            turn.error_kind = f"status_{ur.status // 100}xx"
                            raise UpstreamError(f"the provider answered {ur.status} during a corrective turn", rule="upstream.status")
                        continue
                    self.final_calls = calls
                    base = st.held_finish or st.last or {}
                    out_chunk = {
                        "id": base.get("id", self.chunk_id),
                        "object": "chat.completion.chunk",
                        "created": base.get("created", self.created),
                        "model": base.get("model", self.model_seen),
                        "choices": [{"index": 0, "delta": tooling.call_delta(calls), "finish_reason": None}],
                    }
                    rendered = self.render.event(out_chunk, None)
                    if rendered is not None:
                        yield rendered
                    if st.held_finish is not None:
                        rendered = self.render.event(st.held_finish, None)
                        if rendered is not None:
                            yield rendered
                break
        finally:
            self._collect(st)
            ex.response_body = self._assembled()

    async def _relay_turn(self, turn: UpstreamTurn, ur: UpstreamResponse, st: _TurnState) -> AsyncIterator[bytes]:
        """The events of one upstream turn, as they are to be relayed; raises a ``WardenError`` when the stream goes bad."""
        parser = self.w.upstream.sse_parser()
        translator = self.w.upstream.dialect.stream()
        done = False
        try:
            try:
                async for chunk in ur.resp.content.iter_any():
                    for ev in parser.feed(chunk):
                        out, done = await self._relay_event(ev, st, turn, translator)
                        if out is not None:
                            yield out
                        if done:
                            break
                    if done:
                        break
                if not done:
                    for ev in parser.close():
                        out, done = await self._relay_event(ev, st, turn, translator)
                        if out is not None:
                            yield out
            finally:
                turn.duration_s = time.perf_counter() - turn.started
                ur.close()
        except ProviderStreamError as e:
            turn.error_kind = "stream_error"
            turn.error = safe_text(e.message, 500)
            raise UpstreamError("the provider reported an error mid-stream", rule="upstream.stream") from None
        except sse.SSEError as e:
            turn.error, turn.error_kind = str(e), "malformed"
            raise UpstreamError("the provider sent a malformed stream", rule="upstream.protocol") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            turn.error, turn.error_kind = "timeout", "timeout"
            raise UpstreamTimeout("the provider stream stalled", rule="upstream.timeout_s") from None
        except aiohttp.ClientError as e:
            turn.error, turn.error_kind = type(e).__name__, "connection"
            raise UpstreamError("the provider stream broke off", rule="upstream.base_url") from None
        if not done and (st.finish_reason is None or translator is not None):
            turn.error, turn.error_kind = "stream ended early", "truncated"
            raise UpstreamError("the provider stream ended before the answer was complete", rule="upstream.protocol")

    async def _relay_event(self, ev: sse.RawEvent, st: _TurnState, turn: UpstreamTurn, translator: StreamTranslator | None) -> tuple[bytes | None, bool]:
        """What to relay of one upstream event (``None``: nothing), and whether it ended the answer (``[DONE]``)."""
        if translator is not None:
            # Another API's event: its chat chunks (already checked against that API's wire), relayed in order.
            outs: list[bytes] = []
            for item in translator.feed(ev):
                out = self.render.keepalive(item) if isinstance(item, bytes) else await self._relay_chunk(item, None, st, turn)
                if out is not None:
                    outs.append(out)
            return (b"".join(outs) if outs else None), translator.done
        data = ev.data
        if data is None:
            # A keep-alive comment is relayed, so idle clients do not give up before the first token.
            return (self.render.keepalive(ev.raw) if ev.raw.startswith(b":") else None), False
        if data == sse.DONE:
            return None, True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise sse.SSEError("an upstream event is not JSON") from None
        if not isinstance(obj, dict):
            raise sse.SSEError("an upstream event is not a JSON object")
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {}
            turn.error_kind = "stream_error"
            turn.error = str(err.get("message", "provider error"))[:500]
            raise UpstreamError("the provider reported an error mid-stream", rule="upstream.stream")
        if depth_exceeds(obj, data, MAX_ANSWER_DEPTH):
            raise sse.SSEError(f"an upstream event nests deeper than {MAX_ANSWER_DEPTH} levels")
        why = wire.check_chunk(obj)
        if why is not None:
            raise sse.SSEError(f"an upstream event is malformed: {why}")
        return await self._relay_chunk(obj, ev.raw, st, turn), False

    async def _relay_chunk(self, obj: dict[str, Any], raw: bytes | None, st: _TurnState, turn: UpstreamTurn) -> bytes | None:
        """What to relay of one checked chat chunk (``raw``: the provider's exact event, when it sent chat chunks)."""
        ex = self.ex
        st.last = obj
        modified = False
        usage = obj.get("usage")
        choices = obj.get("choices")
        if usage:
            ex.add_usage(usage)
            if not choices:
                st.usage_chunk = obj
                return None
        if isinstance(obj.get("model"), str):
            ex.response_model = obj["model"]
        if isinstance(choices, list):
            visible = False
            for ch in choices:
                delta = ch.get("delta")
                fr = ch.get("finish_reason")
                first = ch.get("index", 0) == 0
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if isinstance(content, str) and first:
                        st.text.append(content)
                    if (delta.get("tool_calls") or delta.get("function_call")) and not first:
                        raise UpstreamError("the provider streamed tool calls in more than one choice", rule="upstream.protocol")
                    if ("tool_calls" in delta or "function_call" in delta) and first:
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
                    if first:
                        st.finish_reason = str(fr)
                        ex.finish_reasons = [str(fr)]
                    if st.calls and first:
                        st.held_finish = obj
                        return None
                    visible = True
            if modified and not visible:
                return None
        if "ttft" not in ex.timings:
            now = time.perf_counter()
            ex.timings["ttft"] = now - ex.started
            turn.ttft_s = now - turn.started
        if self.watching:
            event = StreamEvent(raw=raw if raw is not None else sse.encode_json(obj), data=obj, modified=modified)
            await self.w.chain.run_stream_event(ex, event)
            if event.drop:
                return None
            modified = event.modified
        return self.render.event(obj, None if modified else raw)

    def _collect(self, st: _TurnState) -> None:
        self.all_text.extend(st.text)
        st.text = []
        self.ex.response_text = "".join(self.all_text)

    def _assembled(self) -> dict[str, Any]:
        """The streamed answer as one chat.completion (for the audit log, idempotent replay, citations)."""
        ex = self.ex
        message: dict[str, Any] = {"role": "assistant", "content": ex.response_text or None}
        if self.final_calls:
            message.update({k: v for k, v in tooling.assistant_message(None, self.final_calls).items() if k in ("tool_calls", "function_call")})
        return {
            "id": self.chunk_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_seen,
            "choices": [{"index": 0, "message": message, "finish_reason": ex.finish_reasons[0] if ex.finish_reasons else None}],
            "usage": ex.usage.as_dict() if ex.usage is not None else None,
        }
