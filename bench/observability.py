"""Per-request cost of observability (metrics and tracing), before and after a change, in the same run.

    python bench/observability.py                   # 20000 exchanges per side and row
    python bench/observability.py --n 2000          # smoke run
    python bench/observability.py --before 4aaa092  # compare against another commit

The observe stage calls ``Metrics.observe_exchange`` (and, with tracing on,
``Tracing.start_exchange`` / ``end_exchange``) once per request of every
route.  Each row drives that over finished exchanges shaped like real ones:
a non-streamed chat with usage, a streamed chat, a chat with two upstream
turns, two tool decisions, retrieval and citations, an embeddings call, and
a pass-through call whose provider answered 503.

"before" rows run ``proxy/metrics.py`` and ``proxy/tracing.py`` as they were
at ``--before`` (loaded from git), on the same exchanges with the fields
those versions read as dicts (``usage``, ``retrieval``, ``citations``), plus
the per-failed-turn ``upstream_errors`` increment the flows made then.
Before and after alternate every ``--chunk`` exchanges, so that both see the
same machine (it is shared and its load drifts); the table shows each side's
mean, median and p99 per exchange, and the ratio of the medians (on a busy
machine the mean is dominated by the few exchanges preempted mid-step).  Tracing rows hand each span to a
SimpleSpanProcessor whose exporter drops it: the row is the cost of building
the spans on the event loop, without the noise of the batch exporter's
thread (in production the OTLP send happens on that thread).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_warden.proxy.config import Config, load_config  # noqa: E402
from llm_warden.proxy.exchange import (  # noqa: E402
    Citation,
    Decision,
    Exchange,
    Principal,
    RetrievalSummary,
    ToolCall,
    ToolDecisionRecord,
    UpstreamTurn,
    Usage,
)
from llm_warden.proxy.metrics import Metrics, upstream_error_kind  # noqa: E402


def exchanges() -> list[Exchange]:
    """Five finished exchanges: plain chat, streamed chat, chat with tools and retrieval, embeddings, a failed pass-through."""
    out = []
    p = Principal(tenant="acme", subject="alice", groups=frozenset({"staff"}))
    for kind in ("plain", "stream", "tools", "embeddings", "passthrough"):
        route, protocol, path = {
            "embeddings": ("embeddings", "openai.embeddings", "/v1/embeddings"),
            "passthrough": ("passthrough POST /v1/files/{file_id}/content", "passthrough", "/v1/files/file-abc/content"),
        }.get(kind, ("chat", "openai.chat", "/v1/chat/completions"))
        ex = Exchange(request_id="req_bench", route=route, method="POST", path=path, protocol=protocol)
        ex.principal = p
        ex.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        t0 = ex.started
        if kind == "passthrough":
            ex.turns.append(UpstreamTurn(index=0, body=b"", status=503, started=t0 + 0.0002, duration_s=0.05, span_id="1111111111111111"))
            ex.status = 503
            ex.ended = t0 + 0.06
            out.append(ex)
            continue
        ex.model = ex.response_model = "text-embedding-3-small" if kind == "embeddings" else "gpt-4o-mini"
        ex.stream = kind == "stream"
        if kind == "embeddings":
            ex.body = {"model": ex.model, "input": "hello"}
            answer: dict[str, Any] = {"object": "list", "model": ex.model, "usage": {"prompt_tokens": 8, "total_tokens": 8}}
            ex.turns.append(UpstreamTurn(index=0, body=b"", status=200, started=t0 + 0.0002, duration_s=0.05, response=answer, span_id="2222222222222222"))
            ex.usage = Usage(8, 0, 8)
            ex.response_body = answer
        else:
            ex.body = {"model": ex.model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
            answer = {"id": "chatcmpl-1", "model": ex.model, "choices": [{"index": 0, "finish_reason": "stop"}], "usage": {"prompt_tokens": 120, "completion_tokens": 40}}
            ex.turns.append(
                UpstreamTurn(
                    index=0, body=b"", status=200, started=t0 + 0.0002, duration_s=0.4, ttft_s=0.1 if ex.stream else None, response=None if ex.stream else answer, span_id="3333333333333333"
                )
            )
            if ex.stream:
                ex.timings["ttft"] = 0.1003
            if kind == "tools":
                ex.turns.append(UpstreamTurn(index=1, body=b"", status=200, started=t0 + 0.41, duration_s=0.3, reason="correction", response=answer, span_id="4444444444444444"))
                ex.tool_decisions = [
                    ToolDecisionRecord(0, ToolCall(id="c1", name="search_orders", arguments="{}"), Decision.repair("tools.schema", "bad")),
                    ToolDecisionRecord(1, ToolCall(id="c2", name="search_orders", arguments="{}"), Decision.allow("tools.policy")),
                ]
                ex.retrieval = RetrievalSummary(mode="hybrid", top_k=5, injected=4, excluded={"acl": 2}, timings_ms={"bm25": 2.0, "vector": 1.0, "total": 4.0})
                ex.timings["retrieval_s"] = 0.004
                ex.citations = [Citation(1, True, "d1", "c1")]
            ex.usage = Usage(120, 40, 160)
            ex.finish_reasons = ["stop"]
            ex.response_body = answer
        ex.status = 200
        ex.ended = t0 + 0.75
        out.append(ex)
    return out


def as_dicts(ex: Exchange) -> Exchange:
    """The same exchange with ``usage``, ``retrieval`` and ``citations`` as the dicts the "before" code reads."""
    old = copy.copy(ex)
    old.usage = ex.usage.as_dict() if ex.usage is not None else None  # type: ignore[assignment]
    old.retrieval = ex.retrieval.as_dict() if ex.retrieval is not None else None  # type: ignore[assignment]
    old.citations = [c.as_dict() for c in ex.citations]  # type: ignore[misc]
    return old


def load_before(rev: str) -> tuple[types.ModuleType, types.ModuleType] | None:
    """``proxy/metrics.py`` and ``proxy/tracing.py`` at ``rev``, as modules (``None`` when git cannot show them)."""
    mods = []
    for name in ("metrics", "tracing"):
        try:
            src = subprocess.run(["git", "show", f"{rev}:proxy/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"cannot load proxy/{name}.py at {rev}: {e}", file=sys.stderr)
            return None
        mod = types.ModuleType(f"before_{name}")
        mod.__file__ = f"<{rev}:proxy/{name}.py>"
        sys.modules[mod.__name__] = mod
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        mods.append(mod)
    return mods[0], mods[1]


class _Request:
    """What ``Tracing.start_exchange`` reads from an aiohttp request (no incoming trace context)."""

    headers: dict[str, str] = {}


def config(sample_ratio: float) -> Config:
    return load_config({"auth": {"mode": "none"}, "audit": {"enabled": False}, "plugins": {"enabled": []}, "tracing": {"sample_ratio": sample_ratio}}, {})


def drop_exporter() -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Drop()


def observe_step(m: Any, counts_errors: bool) -> Callable[[Exchange], None]:
    """One observe stage, metrics only; the "before" metrics left upstream errors to the flows, so add their increments."""

    def step(ex: Exchange) -> None:
        total = (ex.ended or time.perf_counter()) - ex.started
        m.observe_exchange(ex, ex.status or 500, total)
        if not counts_errors:
            for t in ex.turns:
                kind = upstream_error_kind(t)
                if kind is not None:
                    m.upstream_errors.labels(kind=kind).inc()

    return step


def traced_step(m: Any, tr: Any, counts_errors: bool) -> Callable[[Exchange], None]:
    observe = observe_step(m, counts_errors)

    def step(ex: Exchange) -> None:
        span = tr.start_exchange(ex, _Request())
        observe(ex)
        tr.end_exchange(ex, span, ex.status or 500)

    return step


def run_pair(
    n: int, chunk: int, before: Callable[[Exchange], None] | None, after: Callable[[Exchange], None], old_exs: list[Exchange], new_exs: list[Exchange]
) -> dict[bool, tuple[float, float, float]]:
    """Mean, median and p99 (microseconds) of ``before`` and ``after``, alternating every ``chunk`` exchanges (so both see the same machine)."""
    steps = [(True, after, new_exs)] + ([(False, before, old_exs)] if before is not None else [])
    for _, step, exs in steps:
        for i in range(min(n, 500)):
            step(exs[i % len(exs)])
    samples: dict[bool, list[float]] = {k: [] for k, _, _ in steps}
    perf = time.perf_counter
    for start in range(0, n, chunk):
        for key, step, exs in steps:
            out = samples[key]
            for i in range(start, min(start + chunk, n)):
                ex = exs[i % len(exs)]
                t = perf()
                step(ex)
                out.append(perf() - t)
    result = {}
    for key, xs in samples.items():
        xs.sort()
        result[key] = (sum(xs) / len(xs) * 1e6, xs[len(xs) // 2] * 1e6, xs[int(len(xs) * 0.99)] * 1e6)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="exchanges per row and round")
    ap.add_argument("--chunk", type=int, default=200, help="exchanges run on one side before switching to the other")
    ap.add_argument("--before", default="4aaa092", help="git revision of the 'before' metrics.py and tracing.py")
    args = ap.parse_args()
    from llm_warden.proxy.tracing import Tracing

    new_exs = exchanges()
    old_exs = [as_dicts(ex) for ex in new_exs]
    old = load_before(args.before)
    cfg = load_config({"auth": {"mode": "none"}, "audit": {"enabled": False}, "plugins": {"enabled": []}}, {})

    def metrics_only() -> tuple[Callable[[Exchange], None] | None, Callable[[Exchange], None]]:
        before = observe_step(old[0].Metrics(cfg.metrics), False) if old is not None else None
        return before, observe_step(Metrics(cfg.metrics), True)

    def tracing(ratio: float) -> Callable[[], tuple[Callable[[Exchange], None] | None, Callable[[Exchange], None]]]:
        def make() -> tuple[Callable[[Exchange], None] | None, Callable[[Exchange], None]]:
            c = config(ratio)
            before = None
            if old is not None:
                before = traced_step(old[0].Metrics(c.metrics), old[1].Tracing(c, drop_exporter(), batch=False), False)
            return before, traced_step(Metrics(c.metrics), Tracing(c, drop_exporter(), batch=False), True)

        return make

    rows = (
        ("metrics (observe_exchange), tracing off", metrics_only),
        ("metrics + tracing, sampled (2-7 spans)", tracing(1.0)),
        ("metrics + tracing, sample_ratio=0", tracing(0.0)),
    )
    print(f"{'per exchange, ' + str(args.n) + ' exchanges, alternating every ' + str(args.chunk):<62} {'mean us':>9} {'median':>9} {'p99 us':>9} {'median after/before':>20}")
    for label, make in rows:
        before, after = make()
        r = run_pair(args.n, args.chunk, before, after, old_exs, new_exs)
        if False in r:
            print(f"  before: {label:<52} {r[False][0]:9.2f} {r[False][1]:9.2f} {r[False][2]:9.2f}")
        ratio = f"{r[True][1] / r[False][1]:19.2f}x" if False in r else ""
        print(f"  after:  {label:<52} {r[True][0]:9.2f} {r[True][1]:9.2f} {r[True][2]:9.2f} {ratio}")


if __name__ == "__main__":
    main()
