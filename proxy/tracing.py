"""OpenTelemetry traces for every exchange, following the GenAI semantic conventions.

Imported only when ``[tracing] enabled = true`` (needs the ``otel`` extra);
with tracing off Warden never imports OpenTelemetry and a request pays one
``is None`` check.

Shape of a trace (one per exchange of every route, continuing an incoming ``traceparent``):

- ``{operation} {model}`` (``chat m``, ``embeddings m``; a route that is not
  inference: ``{method} {route}``, the bounded route name, never the raw
  path) — kind SERVER: the whole exchange as the application saw it, from
  arrival to the last byte, with the GenAI request/response attributes
  (``gen_ai.operation.name``, ``gen_ai.provider.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.response.id``,
  ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens`` /
  ``output_tokens`` summed over all turns, sampling parameters,
  ``server.address`` / ``server.port`` of the provider, ``error.type``) and
  Warden's own (``warden.request_id``, ``warden.tenant``, ``warden.rule``...).
  SERVER, because Warden receives this request; the application's own
  instrumentation (if any) holds the CLIENT span above it.
- ``retrieval {tenant}`` — kind INTERNAL, child: the permission-scoped search
  (in process), from ``ex.retrieval`` and ``ex.timings["retrieval_s"]``.
- the same name, kind CLIENT, one child per upstream turn (the initial call
  and every corrective turn): the real provider calls, each with the span id
  the turn sent upstream in its ``traceparent`` (``UpstreamTurn.span_id``), so
  a provider's spans hang below the turn that caused them.  Each carries its
  own answer's ``gen_ai.response.*`` and ``gen_ai.usage.*`` where known,
  ``warden.turn.index`` / ``warden.turn.reason``, the provider's HTTP status,
  ``gen_ai.response.time_to_first_chunk`` for streams, and ``error.type``.
- ``execute_tool {tool}`` — kind INTERNAL, child, one per tool call the
  model emitted: Warden's verdict on the call (``gen_ai.tool.name``,
  ``gen_ai.tool.call.id``, ``warden.decision``, ``warden.rule``), placed at
  the end of the turn that produced it.  Warden judges calls; the
  application executes the allowed ones.

Child spans are written when the exchange ends, with the start and end times
the exchange recorded (``UpstreamTurn.started`` / ``duration_s``), so the
request path does no tracing work beyond starting the SERVER span.

Content (prompts, answers, retrieval query and documents, tool arguments,
refusal reasons) is recorded only with ``capture_content = true``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llm_warden.proxy.config import Config
from llm_warden.proxy.mcp import telemetry as mcp_telemetry
from llm_warden.proxy.metrics import turn_outcome

if TYPE_CHECKING:
    from aiohttp import web

    from llm_warden.proxy.exchange import Exchange, UpstreamTurn

log = logging.getLogger("warden.tracing")

_OPERATIONS = {"openai.chat": "chat", "anthropic.messages": "chat", "openai.responses": "chat", "openai.embeddings": "embeddings"}
"""``gen_ai.operation.name`` by ``Exchange.protocol``; other protocols are not inference (no GenAI attributes)."""
_SAMPLING = (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"), ("seed", "gen_ai.request.seed"))
_PENALTIES = (("frequency_penalty", "gen_ai.request.frequency_penalty"), ("presence_penalty", "gen_ai.request.presence_penalty"))


def _headers(env: str) -> dict[str, str] | None:
    """``key=value,key2=value2`` from the environment variable ``env`` (the OTLP header syntax)."""
    raw = os.environ.get(env, "") if env else ""
    out: dict[str, str] = {}
    for part in raw.split(","):
        k, sep, v = part.partition("=")
        if sep and k.strip():
            out[k.strip()] = v.strip()
    return out or None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-warden")
    except PackageNotFoundError:
        return "dev"


class TurnIdGenerator(RandomIdGenerator):
    """Random ids, except the span id of a span started right after :meth:`preset`.

    The SDK asks its ``IdGenerator`` for the id of every new span; a turn's
    CLIENT span must carry the id that turn already sent upstream in its
    ``traceparent``.  Spans are started on the event loop thread only, and
    the preset is consumed by the very next ``start_span``.
    """

    def __init__(self) -> None:
        self._next: int | None = None

    def preset(self, span_id: int | None) -> None:
        self._next = span_id

    def generate_span_id(self) -> int:
        sid = self._next
        if sid is not None:
            self._next = None
            return sid
        return super().generate_span_id()


def _span_id(hex16: str) -> int | None:
    """A turn's ``span_id`` (16 hex digits, not all zero) as an int, else ``None``."""
    if len(hex16) != 16:
        return None
    try:
        v = int(hex16, 16)
    except ValueError:
        return None
    return v or None


class Tracing:
    """The tracer of one Warden: a private TracerProvider (never the global one) and its exporter."""

    def __init__(self, config: Config, exporter: SpanExporter | None = None, *, batch: bool | None = None) -> None:
        """Export to the configured OTLP/HTTP endpoint, or to ``exporter`` (tests, benchmarks).

        ``batch`` (default: only for OTLP) queues spans and exports them from
        a background thread; otherwise each span is exported as it ends.
        """
        cfg = config.tracing
        self.cfg = cfg
        self.capture = cfg.capture_content
        self.provider_name = config.upstream.provider_name
        self.upstream_api = config.upstream.api
        u = urlsplit(config.upstream.base_url)
        self.server_address = u.hostname or ""
        self.server_port = u.port or (443 if u.scheme == "https" else 80)
        version = _version()
        self.ids = TurnIdGenerator()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name, "service.version": version}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
            shutdown_on_exit=False,
            id_generator=self.ids,
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=cfg.endpoint, headers=_headers(cfg.headers_env), timeout=cfg.export_timeout_s)
            batch = True if batch is None else batch
        self.provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("warden", version)
        self.propagator = TraceContextTextMapPropagator()

    async def shutdown(self) -> None:
        """Flush pending spans and stop the exporter (off the event loop: it may do network I/O)."""
        await asyncio.to_thread(self.provider.shutdown)

    # -- the exchange span ---------------------------------------------------------

    def start_exchange(self, ex: Exchange, request: web.Request) -> Span:
        """Start the SERVER span (continuing an incoming ``traceparent``) and put its ids on the exchange.

        ``ex.trace_id`` and ``ex.traceparent`` then name the real span, so
        the audit record and the upstream request carry them.
        """
        headers = request.headers
        parent = None
        if "traceparent" in headers:
            carrier = {"traceparent": headers["traceparent"]}
            if "tracestate" in headers:
                carrier["tracestate"] = headers["tracestate"]
            parent = self.propagator.extract(carrier)
        span = self.tracer.start_span(
            span_name(ex),
            context=parent,
            kind=SpanKind.SERVER,
            start_time=int(ex.wall_time * 1e9),
            attributes={"http.request.method": ex.method, "url.path": ex.path, "warden.request_id": ex.request_id, "warden.route": ex.route},
        )
        sc = span.get_span_context()
        ex.trace_id = format(sc.trace_id, "032x")
        ex.traceparent = f"00-{ex.trace_id}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
        return span

    def end_exchange(self, ex: Exchange, span: Span, status: int) -> None:
        """Name and describe the SERVER span, write its children, and end it (now)."""
        end_ns = time.time_ns()
        if not span.is_recording():
            span.end(end_time=end_ns)
            return
        op = _OPERATIONS.get(ex.protocol)
        span.update_name(span_name(ex))
        span.set_attributes(self._exchange_attributes(ex, status, op))
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, ex.error.message[:200] if ex.error else f"status {status}"))
        ctx = trace.set_span_in_context(span)
        if ex.retrieval is not None:
            self._retrieval_span(ex, ctx)
        last = len(ex.turns) - 1
        for i, turn in enumerate(ex.turns):
            self._turn_span(ex, turn, ctx, op, last == 0, ex.cut if i == last else None)
        if ex.tool_decisions:
            self._tool_spans(ex, ctx)
        span.end(end_time=end_ns)

    def _ns(self, ex: Exchange, perf: float) -> int:
        """A ``perf_counter`` instant of this exchange as epoch nanoseconds."""
        return int((ex.wall_time + (perf - ex.started)) * 1e9)

    def _exchange_attributes(self, ex: Exchange, status: int, op: str | None) -> dict[str, Any]:
        a: dict[str, Any] = {"http.response.status_code": status, "warden.stream": ex.stream, "warden.turns": len(ex.turns), "warden.protocol": ex.protocol}
        if ex.principal is not None:
            a["warden.tenant"] = ex.principal.tenant
        if op is not None:
            a.update(self._client_base(ex, op))
            if ex.stream:
                a["gen_ai.request.stream"] = True
            body = ex.body
            if isinstance(body, dict):
                _request_params(body, op, a)
            rb = ex.response_body
            _answer_attributes(op, rb if isinstance(rb, dict) else None, a)
            if ex.response_model:
                a["gen_ai.response.model"] = ex.response_model
            if ex.finish_reasons and op == "chat":
                a["gen_ai.response.finish_reasons"] = tuple(ex.finish_reasons)
            usage = ex.usage
            if usage is not None:
                a["gen_ai.usage.input_tokens"] = usage.prompt_tokens
                if op == "chat":
                    a["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if ex.mcp is not None:
            a.update(mcp_telemetry.attributes(ex.mcp))
        corrections = sum(1 for t in ex.turns if t.reason != "initial")
        if corrections:
            a["warden.corrective_turns"] = corrections
        if ex.error is not None:
            a["error.type"] = ex.error.code
            if ex.error.rule:
                a["warden.rule"] = ex.error.rule
        elif status >= 400:
            a["error.type"] = str(status)
        if ex.cut:
            a["warden.cut"] = ex.cut
        if ex.client_disconnected:
            a["warden.client_disconnected"] = True
        if ex.citations:
            a["warden.citations"] = len(ex.citations)
            a["warden.citations_invalid"] = sum(1 for c in ex.citations if not c.valid)
        if self.capture and op == "chat":
            body = ex.body if isinstance(ex.body, dict) else {}
            a["gen_ai.input.messages"] = self._clip(orjson.dumps(_input_messages(body.get("messages"))).decode())
            out = _output_messages(ex)
            if out:
                a["gen_ai.output.messages"] = self._clip(orjson.dumps(out).decode())
        return a

    def _client_base(self, ex: Exchange, op: str) -> dict[str, Any]:
        a: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "gen_ai.provider.name": self.provider_name,
            "server.address": self.server_address,
            "server.port": self.server_port,
        }
        if ex.model:
            a["gen_ai.request.model"] = ex.model
        return a

    def _clip(self, text: str) -> str:
        n = self.cfg.content_max_chars
        return text if len(text) <= n else text[:n] + "…"

    # -- children ----------------------------------------------------------------------

    def _turn_span(self, ex: Exchange, turn: UpstreamTurn, ctx: Any, op: str | None, only: bool, cut: str | None) -> None:
        """The CLIENT span of one upstream turn, with the span id the turn sent upstream.

        Its answer's attributes come from ``turn.response`` (a non-streamed
        turn's parsed answer); the single turn of an exchange also takes the
        exchange's own (streamed answers, relayed bodies), which are then
        that turn's.
        """
        start = self._ns(ex, turn.started)
        end = self._ns(ex, turn.started + turn.duration_s) if turn.duration_s is not None else time.time_ns()
        a: dict[str, Any] = {"http.request.method": ex.method, "warden.turn.index": turn.index, "warden.turn.reason": turn.reason, "warden.upstream.api": self.upstream_api}
        if op is not None:
            a.update(self._client_base(ex, op))
            resp = turn.response
            if isinstance(resp, dict):
                _answer_attributes(op, resp, a)
            elif only:
                rb = ex.response_body
                _answer_attributes(op, rb if isinstance(rb, dict) else None, a)
                if ex.response_model:
                    a["gen_ai.response.model"] = ex.response_model
                if ex.finish_reasons and op == "chat":
                    a["gen_ai.response.finish_reasons"] = tuple(ex.finish_reasons)
                if ex.usage is not None and "gen_ai.usage.input_tokens" not in a:
                    a["gen_ai.usage.input_tokens"] = ex.usage.prompt_tokens
                    if op == "chat":
                        a["gen_ai.usage.output_tokens"] = ex.usage.completion_tokens
        else:
            a["server.address"] = self.server_address
            a["server.port"] = self.server_port
        if turn.status is not None:
            a["http.response.status_code"] = turn.status
        if turn.ttft_s is not None:
            a["gen_ai.response.time_to_first_chunk"] = turn.ttft_s
        error = _turn_error(turn, cut)
        if error is not None:
            a["error.type"] = error
            a["warden.turn.error"] = (turn.error or "")[:200]
        sid = _span_id(turn.span_id)
        if sid is not None:
            self.ids.preset(sid)
        try:
            span = self.tracer.start_span(span_name(ex), context=ctx, kind=SpanKind.CLIENT, start_time=start, attributes=a)
        finally:
            self.ids.preset(None)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=max(end, start))

    def _retrieval_span(self, ex: Exchange, ctx: Any) -> None:
        r = ex.retrieval
        assert r is not None
        took = ex.timings.get("retrieval_s")
        if took is None and "total" in r.timings_ms:
            took = r.timings_ms["total"] / 1000.0
        started = ex.timings.get("retrieval_started")
        if started is None:
            # Retrieval runs in the request hooks, just before the first upstream turn.
            end_perf = ex.turns[0].started if ex.turns else (ex.ended or time.perf_counter())
            started = end_perf - (took or 0.0)
        start = self._ns(ex, started)
        end = self._ns(ex, started + (took or 0.0))
        source = ex.principal.tenant if ex.principal else "warden"
        a: dict[str, Any] = {"gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": source}
        if r.top_k is not None:
            a["gen_ai.request.top_k"] = r.top_k
        for key in ("mode", "candidates", "context_tokens", "skipped"):
            v = getattr(r, key)
            if v is not None:
                a[f"warden.retrieval.{key}"] = v
        if r.skipped is None:
            a["warden.retrieval.injected"] = r.injected
        for reason, count in r.excluded.items():
            a[f"warden.retrieval.excluded.{reason}"] = count
        for stage, ms in r.timings_ms.items():
            a[f"warden.retrieval.{stage}_ms"] = float(ms)
        failed = r.skipped == "error" or r.error is not None
        if failed:
            a["error.type"] = "retrieval_error"
        if self.capture:
            if r.query is not None:
                a["gen_ai.retrieval.query.text"] = self._clip(r.query)
            docs = [{"id": c.doc_id, "score": c.score} for c in ex.retrieved if c.injected]
            if docs:
                a["gen_ai.retrieval.documents"] = self._clip(orjson.dumps(docs).decode())
        span = self.tracer.start_span(f"retrieval {source}", context=ctx, kind=SpanKind.INTERNAL, start_time=start, attributes=a)
        if failed:
            span.set_status(Status(StatusCode.ERROR, (r.error or "retrieval failed")[:200]))
        span.end(end_time=max(end, start))

    def _tool_spans(self, ex: Exchange, ctx: Any) -> None:
        turns = ex.turns
        for rec in ex.tool_decisions:
            turn = turns[rec.turn] if 0 <= rec.turn < len(turns) else None
            at = self._ns(ex, turn.started + (turn.duration_s or 0.0)) if turn is not None else time.time_ns()
            d = rec.decision
            a: dict[str, Any] = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": rec.call.name,
                "gen_ai.tool.call.id": rec.call.id,
                "gen_ai.tool.type": "function",
                "warden.decision": d.kind,
                "warden.rule": d.rule,
                "warden.turn.index": rec.turn,
            }
            if d.approval_id:
                a["warden.approval_id"] = d.approval_id
            if rec.call.server is not None:
                a["warden.mcp.server"] = rec.call.server
            if self.capture:
                a["gen_ai.tool.call.arguments"] = self._clip(rec.call.arguments)
                if d.reason:
                    a["warden.reason"] = self._clip(d.reason)
            span = self.tracer.start_span(f"execute_tool {rec.call.name}", context=ctx, kind=SpanKind.INTERNAL, start_time=at, attributes=a)
            span.end(end_time=at)


def span_name(ex: Exchange) -> str:
    """The name of an exchange's SERVER span and of its turns' CLIENT spans (bounded: never the raw path).

    Inference: ``{gen_ai.operation.name} {model}`` (or the operation alone
    while the model is unknown); any other route: ``{method} {route}``, the
    route being the bounded route name (for pass-through routes derived from
    the configured template, ids never included).
    """
    op = _OPERATIONS.get(ex.protocol)
    if op is not None:
        return f"{op} {ex.model}" if ex.model else op
    if ex.mcp is not None:
        return mcp_telemetry.span_name(ex.mcp)
    words = ex.route.split(" ")
    if ex.method in words:
        # A route name that carries its method already (pass-through routes): the method leads, once.
        words.remove(ex.method)
    return " ".join((ex.method, *words))


def _answer_attributes(op: str, resp: dict[str, Any] | None, a: dict[str, Any]) -> None:
    """``gen_ai.response.*`` and ``gen_ai.usage.*`` from one parsed provider answer (what it reported, nothing invented)."""
    if resp is None:
        return
    if isinstance(resp.get("model"), str):
        a["gen_ai.response.model"] = resp["model"]
    if isinstance(resp.get("id"), str):
        a["gen_ai.response.id"] = resp["id"]
    usage = resp.get("usage")
    if isinstance(usage, dict):
        v = usage.get("prompt_tokens")
        if isinstance(v, int) and not isinstance(v, bool):
            a["gen_ai.usage.input_tokens"] = v
        v = usage.get("completion_tokens")
        if op == "chat" and isinstance(v, int) and not isinstance(v, bool):
            a["gen_ai.usage.output_tokens"] = v
    if op == "chat":
        choices = resp.get("choices")
        if isinstance(choices, list):
            reasons = tuple(str(c["finish_reason"]) for c in choices if isinstance(c, dict) and c.get("finish_reason") is not None)
            if reasons:
                a["gen_ai.response.finish_reasons"] = reasons


def _request_params(body: dict[str, Any], op: str, a: dict[str, Any]) -> None:
    """Request parameters of a body as ``gen_ai.request.*`` attributes."""
    if op == "embeddings":
        fmt = body.get("encoding_format")
        if isinstance(fmt, str):
            a["gen_ai.request.encoding_formats"] = (fmt,)
        dims = body.get("dimensions")
        if isinstance(dims, int) and not isinstance(dims, bool):
            a["gen_ai.embeddings.dimension.count"] = dims
        return
    for key, attr in _SAMPLING + _PENALTIES:
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            a[attr] = v
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(mt, int) and not isinstance(mt, bool):
        a["gen_ai.request.max_tokens"] = mt
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != 1:
        a["gen_ai.request.choice.count"] = n
    stop = body.get("stop")
    if isinstance(stop, str):
        a["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        a["gen_ai.request.stop_sequences"] = tuple(stop)


def _turn_error(turn: UpstreamTurn, cut: str | None) -> str | None:
    """``error.type`` of a turn: the provider's status code, else the failure kind of ``warden_upstream_errors_total`` (or ``cancelled``)."""
    status = turn.status
    if status is not None and status >= 400:
        return str(status)
    return turn_outcome(turn, cut)


def _output_messages(ex: Exchange) -> list[dict[str, Any]]:
    """The answer (every choice, with tool calls) in the GenAI conventions' shape."""
    rb = ex.response_body
    choices = rb.get("choices") if isinstance(rb, dict) else None
    if isinstance(choices, list) and choices:
        out = []
        for ch in choices:
            if isinstance(ch, dict) and isinstance(ch.get("message"), dict):
                (msg,) = _input_messages([ch["message"]])
                msg["finish_reason"] = ch.get("finish_reason")
                out.append(msg)
        return out
    if ex.response_text is not None:
        return [{"role": "assistant", "parts": [{"type": "text", "content": ex.response_text}], "finish_reason": ex.finish_reasons[0] if ex.finish_reasons else None}]
    return []


def _input_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages in the GenAI conventions' ``{role, parts}`` shape."""
    out: list[dict[str, Any]] = []
    if not isinstance(messages, Sequence):
        return out
    for m in messages:
        if not isinstance(m, dict):
            continue
        parts: list[dict[str, Any]] = []
        content = m.get("content")
        if isinstance(content, str) and m.get("role") == "tool":
            parts.append({"type": "tool_call_response", "id": m.get("tool_call_id"), "result": content})
        elif isinstance(content, str):
            parts.append({"type": "text", "content": content})
        elif isinstance(content, list):
            parts.extend({"type": "text", "content": p.get("text")} for p in content if isinstance(p, dict) and p.get("type") == "text")
        for tc in m.get("tool_calls") or []:
            if isinstance(tc, dict) and isinstance(tc.get("function"), dict):
                parts.append({"type": "tool_call", "id": tc.get("id"), "name": tc["function"].get("name"), "arguments": tc["function"].get("arguments")})
        out.append({"role": m.get("role"), "parts": parts})
    return out
