"""Per-request cost of observability: metrics, the JSON request log line and tracing.

    python bench/observability.py                  # 20000 exchanges per row
    python bench/observability.py --n 2000         # smoke run

Each row drives the data plane's end-of-request step (``dataplane._observe``,
plus ``Tracing.start_exchange`` where tracing is on) over finished exchanges
shaped like real ones (a non-streamed chat with usage, a streamed chat, and a
chat with two upstream turns, two tool decisions and retrieval), and reports
the mean and p99 per exchange.  The first row is the core's metrics-only
``_observe`` as it was before this work (same run, same exchanges), the
baseline to compare against.  Log rows write JSON lines to /dev/null through
the background writer and include the writer's time (it is flushed inside the
timed region).  Tracing rows export through a BatchSpanProcessor to an
exporter that drops the spans (the OTLP network send happens on the exporter
thread in production too).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import dataplane  # noqa: E402
from proxy.app import Warden  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.exchange import Decision, Exchange, Principal, ToolCall, ToolDecisionRecord, UpstreamTurn  # noqa: E402
from proxy.logs import setup_logging, shutdown_logging  # noqa: E402


def exchanges() -> list[Exchange]:
    """Three finished exchanges: plain, streamed, and with tools and retrieval."""
    out = []
    p = Principal(tenant="acme", subject="alice", groups=frozenset({"staff"}))
    for kind in ("plain", "stream", "tools"):
        ex = Exchange(request_id="req_bench", route="chat", method="POST", path="/v1/chat/completions")
        ex.principal = p
        ex.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        ex.model = ex.response_model = "gpt-4o-mini"
        ex.body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
        ex.stream = kind == "stream"
        t0 = ex.started
        ex.turns.append(UpstreamTurn(index=0, body=b"", status=200, started=t0 + 0.0002, duration_s=0.4, ttft_s=0.1 if ex.stream else None))
        if ex.stream:
            ex.timings["ttft"] = 0.1003
        if kind == "tools":
            ex.turns.append(UpstreamTurn(index=1, body=b"", status=200, started=t0 + 0.41, duration_s=0.3, reason="correction"))
            ex.tool_decisions = [
                ToolDecisionRecord(0, ToolCall(id="c1", name="search_orders", arguments="{}"), Decision.repair("tools.schema", "bad")),
                ToolDecisionRecord(1, ToolCall(id="c2", name="search_orders", arguments="{}"), Decision.allow("tools.policy")),
            ]
            ex.retrieval = {"mode": "hybrid", "top_k": 5, "injected": 4, "excluded": {"acl": 2}, "timings_ms": {"bm25": 2.0, "vector": 1.0, "total": 4.0}}
            ex.timings["retrieval_s"] = 0.004
            ex.citations = [{"n": 1, "valid": True}]
        ex.usage = {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}
        ex.finish_reasons = ["stop"]
        ex.response_body = {"id": "chatcmpl-1", "model": "gpt-4o-mini"}
        ex.status = 200
        ex.ended = t0 + 0.75
        out.append(ex)
    return out


def baseline_observe(w: Warden, ex: Exchange, resp: Any, access_log: bool = False) -> None:
    """The core's ``_observe`` before this work (metrics only, request line when access_log is on)."""
    m = w.metrics
    end = ex.ended or time.perf_counter()
    total = end - ex.started
    status = ex.status or 500
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
    if access_log:
        p = ex.principal
        _log.info(
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


_log = logging.getLogger("warden.dataplane")


class _Request:
    """What ``Tracing.start_exchange`` reads from an aiohttp request (no incoming trace context)."""

    headers: dict[str, str] = {}


def warden(access_log: bool, tracing: float | None) -> Warden:
    cfg = load_config(
        {
            "auth": {"mode": "none"},
            "audit": {"enabled": False},
            "plugins": {"enabled": []},
            "logging": {"access_log": access_log},
            "tracing": {"enabled": False, "sample_ratio": tracing if tracing is not None else 1.0},
        },
        {},
    )
    w = Warden(cfg, {})
    if tracing is not None:
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from proxy.tracing import Tracing

        class Drop(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        t = Tracing(cfg, Drop(), batch=True)
        w.tracing = t
    return w


def quiet() -> None:
    logging.getLogger().setLevel(logging.CRITICAL)


def run(n: int, step: Callable[[Exchange], None], exs: list[Exchange], flush: Callable[[], None] | None = None) -> tuple[float, float]:
    """Mean (including any flush) and p99 of one step, in microseconds."""
    for i in range(min(n, 500)):
        step(exs[i % len(exs)])
    samples = []
    t_all = time.perf_counter()
    for i in range(n):
        ex = exs[i % len(exs)]
        t = time.perf_counter()
        step(ex)
        samples.append(time.perf_counter() - t)
    if flush is not None:
        flush()
    wall = time.perf_counter() - t_all
    samples.sort()
    return wall / n * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="exchanges per row")
    args = ap.parse_args()
    quiet()
    exs = exchanges()
    devnull = open(os.devnull, "w")  # noqa: SIM115
    rows: list[tuple[str, float, float]] = []

    w = warden(False, None)
    rows.append(("baseline: core _observe before (metrics only)", *run(args.n, lambda ex: baseline_observe(w, ex, None), exs)))
    w = warden(False, None)
    rows.append(("metrics (observe_exchange), tracing off", *run(args.n, lambda ex: dataplane._observe(w, ex, None), exs)))

    setup_logging("info", stream=devnull, background=False)
    w = warden(True, None)
    rows.append(("baseline: core _observe before + request line (sync write)", *run(args.n, lambda ex: baseline_observe(w, ex, None, True), exs)))
    setup_logging("info", stream=devnull, background=False)
    w = warden(True, None)
    rows.append(("metrics + JSON request line (sync write)", *run(args.n, lambda ex: dataplane._observe(w, ex, None), exs)))
    setup_logging("info", stream=devnull)
    w = warden(True, None)
    rows.append(("metrics + JSON request line (background writer)", *run(args.n, lambda ex: dataplane._observe(w, ex, None), exs, shutdown_logging)))
    setup_logging("warning", stream=devnull)
    w = warden(True, None)
    rows.append(("metrics + request line filtered by level=warning", *run(args.n, lambda ex: dataplane._observe(w, ex, None), exs, shutdown_logging)))
    quiet()

    for ratio, label in ((1.0, "sampled"), (0.0, "sample_ratio=0")):
        w = warden(False, ratio)
        tr = w.tracing
        assert tr is not None

        def traced(ex: Exchange, w: Warden = w, tr: Any = tr) -> None:
            span = tr.start_exchange(ex, _Request())
            dataplane._observe(w, ex, None, span)

        rows.append((f"metrics + tracing ({label}, 1-5 spans)", *run(args.n, traced, exs, lambda tr=tr: tr.provider.force_flush())))
        tr.provider.shutdown()

    print(f"{'per exchange, ' + str(args.n) + ' exchanges':<56} {'mean us':>9} {'p99 us':>9}")
    for name, mean, p99 in rows:
        print(f"{name:<56} {mean:9.2f} {p99:9.2f}")


if __name__ == "__main__":
    main()
