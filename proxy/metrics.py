"""Prometheus metrics: counters, histograms and gauges in memory, one registry per server.

Names follow Prometheus conventions (``warden_`` prefix, base units,
``_total`` counters: prometheus-client appends ``_total`` itself, so
``Counter("warden_requests", ...)`` is exposed as ``warden_requests_total``).
Labels are bounded: route, model (normalised, else ``other``), status class,
stream, decision, rule; never a user or request id; a tenant only with
``[metrics] tenant_label = true`` (and then bounded too).

Who updates what:

- the core, per request, from the finished :class:`~proxy.exchange.Exchange`
  (:func:`Metrics.observe_exchange`, called by the data plane): requests,
  latencies, tokens, tool decisions, retrieval timings and citations;
- the core, where the event happens: upstream errors, refusals, corrective
  turns, audit records and failures, config reloads;
- plugins, through the ``Metrics`` object they get as
  ``ctx.services["metrics"]`` in ``start()``: either by updating an attribute
  (``metrics.ratelimit_decisions.labels(rule=..., decision=...).inc()``) or,
  for state they already keep, by registering a callback read at scrape time
  (``metrics.register_gauge_callback("approvals_pending", lambda: n)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import MetricsConfig

if TYPE_CHECKING:
    from proxy.exchange import Exchange

log = logging.getLogger("warden.metrics")

# Sub-millisecond resolution for Warden's own time; up to minutes for long generations.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMMIT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
CHUNK_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)

OTHER = "other"
CallbackValue = float | int | bool | Mapping[str | tuple[str, ...], float | int | bool] | None


class LabelValues:
    """Bounds one label: the configured values, else the first ``limit`` distinct values seen, else ``other``."""

    __slots__ = ("allowed", "limit", "max_len", "seen")

    def __init__(self, allowed: Iterable[str], limit: int, max_len: int = 64) -> None:
        self.allowed = frozenset(allowed)
        self.limit = limit
        self.max_len = max_len
        self.seen: set[str] = set()

    def __call__(self, value: str | None, empty: str = "none") -> str:
        if not value:
            return empty
        if value in self.allowed or value in self.seen:
            return value
        if not self.allowed and len(self.seen) < self.limit and len(value) <= self.max_len and value.isprintable():
            self.seen.add(value)
            return value
        return OTHER


class StateMetric(Collector):
    """A gauge (or counter) whose value a plugin may push, or expose through a callback read at scrape time.

    Push style works exactly like prometheus-client (``.set()``, ``.inc()``,
    ``.labels(...).set()``: every attribute of the wrapped metric is reachable).
    With a callback set, the callback's answer replaces the pushed values:
    a number (or bool) for an unlabelled metric, or a mapping from label
    value(s) to number for a labelled one; ``None`` means "no sample now".
    A callback runs on the event loop at each scrape: it must be cheap and
    must not block.  One that raises is logged and its metric is skipped for
    that scrape (a scrape never fails because of a plugin).
    """

    def __init__(self, kind: Literal["gauge", "counter"], name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._push: Any = (Gauge if kind == "gauge" else Counter)(name, documentation, labelnames, registry=None)
        self.callback: Callable[[], CallbackValue] | None = None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._push, attr)

    def _family(self) -> GaugeMetricFamily | CounterMetricFamily:
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        cb = self.callback
        if cb is None:
            return self._push.collect()  # type: ignore[no-any-return]
        try:
            value = cb()
            fam = self._family()
            if value is None:
                return [fam]
            if self.labelnames:
                if not isinstance(value, Mapping):
                    raise TypeError(f"callback for labelled metric {self.name} must return a mapping")
                for key, v in value.items():
                    labels = [key] if isinstance(key, str) else [str(k) for k in key]
                    if len(labels) != len(self.labelnames):
                        raise ValueError(f"{self.name}: {key!r} does not match labels {self.labelnames}")
                    fam.add_metric(labels, float(v))
            else:
                if isinstance(value, Mapping):
                    raise TypeError(f"callback for unlabelled metric {self.name} must return a number")
                fam.add_metric([], float(value))
            return [fam]
        except Exception:
            log.exception("metrics callback for %s failed; skipping it in this scrape", self.name)
            return []


class Metrics:
    """All of Warden's metrics, registered on a private registry."""

    def __init__(self, cfg: MetricsConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        n = cfg.max_label_values
        self.model_values = LabelValues(cfg.models, n)
        self.tenant_values = LabelValues(cfg.tenants, n)
        self.tool_values = LabelValues(cfg.tools, n)
        self.retriever_values = LabelValues((), 16, 32)
        self._children: dict[tuple[str, str, str, bool, str], tuple[Any, Any, Any]] = {}
        self._model_children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self.state: dict[str, StateMetric] = {}
        r = self.registry
        req_labels = ["route", "model", "status_class", "tenant"] if cfg.tenant_label else ["route", "model", "status_class"]

        # -- traffic (core, per request) ----------------------------------------------
        self.requests = Counter("warden_requests", "Requests handled, by route, model and status class (tenant with [metrics] tenant_label).", req_labels, registry=r)
        """Core (data plane, at the end of every request)."""
        self.request_duration = Histogram(
            "warden_request_duration_seconds", "Whole request latency as the client sees it.", ["route", "model", "stream"], buckets=LATENCY_BUCKETS, registry=r
        )
        """Core (data plane)."""
        self.upstream_duration = Histogram(
            "warden_upstream_duration_seconds", "Time spent waiting on the provider, per upstream turn.", ["route", "model"], buckets=LATENCY_BUCKETS, registry=r
        )
        """Core (data plane, one observation per upstream turn)."""
        self.ttft = Histogram(
            "warden_time_to_first_token_seconds", "Time from request arrival to the first relayed streamed event.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        """Core (data plane, streamed answers)."""
        self.overhead = Histogram(
            "warden_overhead_seconds", "Time spent in Warden itself (request latency minus upstream time; streams: up to the first event).", ["route"], buckets=OVERHEAD_BUCKETS, registry=r
        )
        """Core (data plane)."""
        self.inflight = Gauge("warden_inflight_requests", "Requests in progress on the data plane.", registry=r)
        """Core (data plane, up on arrival, down when the request ends)."""
        self.upstream_errors = Counter("warden_upstream_errors", "Upstream failures by kind (connection, timeout, status_4xx/5xx, malformed, truncated, stream_error).", ["kind"], registry=r)
        """Core (upstream calls in proxy/chat.py and the pass-through)."""
        self.tokens = Counter("warden_tokens", "Tokens reported by the provider, by model and type (prompt, completion).", ["model", "type"], registry=r)
        """Core (from the exchange's usage, streamed and not)."""
        self.refusals = Counter("warden_refusals", "Requests Warden refused, by rule and status.", ["rule", "status"], registry=r)
        """Core (every refusal names its rule)."""

        # -- tools ---------------------------------------------------------------------
        self.tool_calls = Counter("warden_tool_calls", "Tool calls judged, by tool and decision (allow, deny, repair, hold).", ["tool", "decision"], registry=r)
        """Core (from ``ex.tool_decisions``: the chain's final verdict on every call)."""
        self.corrective_turns = Counter("warden_corrective_turns", "Corrective turns run after a refused tool call, by reason (deny, repair, hold).", ["reason"], registry=r)
        """Core (proxy/chat.py, per refused call that led to a corrective turn)."""
        self.approvals_pending = self._state("gauge", "warden_approvals_pending", "Tool-call approvals waiting for a reviewer.")
        """Tools plugin (callback: its pending-approval count)."""
        self.read_only = self._state("gauge", "warden_read_only", "1 while read-only mode is on, per tenant ('*' = global).", ("tenant",))
        """Tools plugin (callback: ``{tenant: 0|1}``, ``'*'`` for the global switch)."""

        # -- retrieval -----------------------------------------------------------------
        self.retrieval_duration = Histogram(
            "warden_retrieval_duration_seconds", "Retrieval time per stage (bm25, vector, embed, fuse, fetch, total).", ["retriever"], buckets=RETRIEVAL_BUCKETS, registry=r
        )
        """Core (from ``ex.retrieval['timings_ms']`` and ``ex.timings['retrieval_s']``)."""
        self.retrieval_chunks_injected = Histogram(
            "warden_retrieval_chunks_injected", "Chunks injected into the prompt per retrieval.", buckets=CHUNK_BUCKETS, registry=r
        )
        """Core (from ``ex.retrieval['injected']``)."""
        self.retrieval_acl_filtered = Counter("warden_retrieval_acl_filtered", "Retrieved candidates withheld because the principal may not read them.", registry=r)
        """Core (from ``ex.retrieval['excluded']['acl']``)."""
        self.retrieval_index_documents = self._state("gauge", "warden_retrieval_index_documents", "Documents in the retrieval store.")
        """Retrieval plugin (callback: its document count)."""
        self.retrieval_index_staleness = self._state(
            "gauge", "warden_retrieval_index_staleness_seconds", "Age of the oldest change not yet searchable (0 when the indexes are up to date)."
        )
        """Retrieval plugin (callback: seconds the indexes lag the store of record)."""
        self.citations = Counter("warden_citations", "Citations found in answers, by validity (false: a number that was never given).", ["valid"], registry=r)
        """Core (from ``ex.citations``)."""

        # -- limits --------------------------------------------------------------------
        self.ratelimit_decisions = self._state(
            "counter", "warden_ratelimit_decisions", "Limit decisions by rule and decision (allow, deny, fail_open, fail_closed).", ("rule", "decision")
        )
        """Limits plugin (push ``.labels(rule, decision).inc()``, or callback: ``{(rule, decision): count}``)."""
        self.limits_backend_up = self._state("gauge", "warden_limits_backend_up", "1 while the limits backend answers (always 1 for memory).")
        """Limits plugin (callback: its backend health)."""

        # -- audit ---------------------------------------------------------------------
        self.audit_records = Counter("warden_audit_records", "Audit records written, by kind (exchange, admin actions...).", ["kind"], registry=r)
        """Core (proxy/app.py, after each record is accepted)."""
        self.audit_write_failures = Counter("warden_audit_write_failures", "Audit records that could not be written.", registry=r)
        """Core (proxy/app.py)."""
        self.audit_queue_depth = self._state("gauge", "warden_audit_queue_depth", "Records waiting in the audit queue (batch durability).")
        """Audit store (callback bound by :meth:`bind_audit`: its ``queue_depth``)."""
        self.audit_writer_restarts = self._state("counter", "warden_audit_writer_restarts", "Times the audit writer process had to be started again.")
        """Audit store (callback bound by :meth:`bind_audit`: its ``writer_restarts``)."""
        self.audit_commit_duration = Histogram(
            "warden_audit_commit_duration_seconds", "Duration of one audit commit (a group of records in batch mode).", buckets=COMMIT_BUCKETS, registry=r
        )
        """Audit store (its ``on_commit(seconds, records)`` hook, bound by :meth:`bind_audit`)."""

        # -- operations ----------------------------------------------------------------
        self.config_reloads = Counter("warden_config_reloads", "Configuration reloads, by result (applied, refused).", ["result"], registry=r)
        """Core (proxy/app.py)."""
        self.build_info = Gauge("warden_build_info", "Always 1; the labels say which Warden runs.", ["version"], registry=r)
        """Core (set once)."""
        self.build_info.labels(version=_version()).set(1)
        # Series that alerts and ratios divide by exist from the first scrape, at zero.
        for kind in ("connection", "timeout", "status_4xx", "status_5xx", "malformed", "truncated", "stream_error"):
            self.upstream_errors.labels(kind=kind)
        for valid in ("true", "false"):
            self.citations.labels(valid=valid)
        for result in ("applied", "refused"):
            self.config_reloads.labels(result=result)
        self.audit_records.labels(kind="exchange")

    def _state(self, kind: Literal["gauge", "counter"], name: str, doc: str, labels: tuple[str, ...] = ()) -> StateMetric:
        m = StateMetric(kind, name, doc, labels)
        self.registry.register(m)
        self.state[name] = m
        return m

    # -- callbacks ---------------------------------------------------------------------

    def _find_state(self, name: str) -> StateMetric:
        full = name if name.startswith("warden_") else f"warden_{name}"
        m = self.state.get(full)
        if m is None:
            attr = getattr(self, name, None)
            m = attr if isinstance(attr, StateMetric) else None
        if m is None:
            raise KeyError(f"{name!r} is not a state metric (have: {', '.join(sorted(self.state))})")
        return m

    def register_gauge_callback(self, name: str, fn: Callable[[], CallbackValue]) -> None:
        """Expose live state: ``fn()`` is read at every scrape.

        ``name`` is the attribute (``"approvals_pending"``) or the metric name
        (``"warden_approvals_pending"``).  For a labelled gauge, ``fn`` returns
        ``{label value (or tuple of values): number}``.  ``fn`` runs on the
        event loop: read a field, never do I/O.
        """
        m = self._find_state(name)
        if m.kind != "gauge":
            raise KeyError(f"{m.name} is a counter: use register_counter_callback")
        m.callback = fn

    def register_counter_callback(self, name: str, fn: Callable[[], CallbackValue]) -> None:
        """Like :meth:`register_gauge_callback`, for a counter a plugin already keeps (values must only grow)."""
        m = self._find_state(name)
        if m.kind != "counter":
            raise KeyError(f"{m.name} is a gauge: use register_gauge_callback")
        m.callback = fn

    def bind_audit(self, audit: Any) -> None:
        """Read the audit store's queue depth at scrape time and time its commits.

        Uses what the store offers: ``queue_depth`` and ``writer_restarts``
        attributes or properties, and an ``on_commit(seconds, records)`` hook slot.
        """
        if audit is None:
            return
        if hasattr(audit, "queue_depth"):
            self.audit_queue_depth.callback = lambda: float(audit.queue_depth)
        if hasattr(audit, "writer_restarts"):
            self.audit_writer_restarts.callback = lambda: float(audit.writer_restarts)
        if hasattr(audit, "on_commit"):
            hist = self.audit_commit_duration

            def on_commit(seconds: float, records: int) -> None:
                hist.observe(seconds)

            audit.on_commit = on_commit

    # -- per request -------------------------------------------------------------------

    def request_children(self, route: str, model: str, status_class: str, stream: bool, tenant: str | None = None) -> tuple[Any, Any, Any]:
        """The labelled children for one request shape, cached (``labels()`` is slow on the hot path)."""
        t = self.tenant_values(tenant) if self.cfg.tenant_label else ""
        key = (route, model, status_class, stream, t)
        hit = self._children.get(key)
        if hit is None:
            if self.cfg.tenant_label:
                req = self.requests.labels(route=route, model=model, status_class=status_class, tenant=t)
            else:
                req = self.requests.labels(route=route, model=model, status_class=status_class)
            hit = (req, self.request_duration.labels(route=route, model=model, stream="true" if stream else "false"), self.overhead.labels(route=route))
            self._children[key] = hit
        return hit

    def model_children(self, route: str, model: str) -> tuple[Any, Any, Any, Any]:
        """(upstream duration, TTFT, prompt tokens, completion tokens) children for a route and model, cached."""
        key = (route, model)
        hit = self._model_children.get(key)
        if hit is None:
            hit = (
                self.upstream_duration.labels(route=route, model=model),
                self.ttft.labels(model=model),
                self.tokens.labels(model=model, type="prompt"),
                self.tokens.labels(model=model, type="completion"),
            )
            self._model_children[key] = hit
        return hit

    def model_label(self, model: str | None) -> str:
        """``model`` if configured (or, with no list, among the first ``max_label_values`` seen), else ``other``."""
        return self.model_values(model)

    def observe_exchange(self, ex: Exchange, status: int, total_s: float) -> float:
        """Count one finished exchange; returns the upstream time it spent (seconds)."""
        model = self.model_values(ex.model)
        requests, duration, overhead = self.request_children(ex.route, model, _STATUS_CLASS.get(status // 100, "other"), ex.stream, ex.principal.tenant if ex.principal else None)
        requests.inc()
        duration.observe(total_s)
        upstream = 0.0
        if ex.turns or ex.usage:
            up_h, ttft_h, prompt_c, completion_c = self.model_children(ex.route, model)
            for t in ex.turns:
                if t.duration_s is not None:
                    upstream += t.duration_s
                    up_h.observe(t.duration_s)
            usage = ex.usage
            if usage:
                v = usage.get("prompt_tokens")
                if isinstance(v, int) and v > 0:
                    prompt_c.inc(v)
                v = usage.get("completion_tokens")
                if isinstance(v, int) and v > 0:
                    completion_c.inc(v)
        else:
            ttft_h = None
        if ex.stream:
            # In a stream the client's reading pace is part of the total; count Warden's time to first byte instead.
            ttft = ex.timings.get("ttft")
            if ttft is not None:
                if ttft_h is None:
                    ttft_h = self.model_children(ex.route, model)[1]
                ttft_h.observe(ttft)
                first = ex.turns[0].ttft_s if ex.turns and ex.turns[0].ttft_s is not None else ttft
                overhead.observe(max(ttft - first, 0.0))
        else:
            overhead.observe(max(total_s - upstream, 0.0))
        if ex.tool_decisions:
            for d in ex.tool_decisions:
                self.tool_calls.labels(tool=self.tool_values(d.call.name, "(unnamed)"), decision=d.decision.kind).inc()
        if ex.retrieval is not None:
            self._observe_retrieval(ex)
        if ex.citations:
            valid = sum(1 for c in ex.citations if c.get("valid"))
            if valid:
                self.citations.labels(valid="true").inc(valid)
            if len(ex.citations) > valid:
                self.citations.labels(valid="false").inc(len(ex.citations) - valid)
        return upstream

    def _observe_retrieval(self, ex: Exchange) -> None:
        r = ex.retrieval
        assert r is not None
        timings = r.get("timings_ms")
        if isinstance(timings, dict):
            for stage, ms in timings.items():
                if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0:
                    self.retrieval_duration.labels(retriever=self.retriever_values(str(stage))).observe(ms / 1000.0)
        if not (isinstance(timings, dict) and "total" in timings):
            total = ex.timings.get("retrieval_s")
            if total is not None:
                self.retrieval_duration.labels(retriever="total").observe(total)
        injected = r.get("injected")
        if isinstance(injected, int) and not isinstance(injected, bool):
            self.retrieval_chunks_injected.observe(injected)
        excluded = r.get("excluded")
        if isinstance(excluded, dict):
            acl = excluded.get("acl")
            if isinstance(acl, int) and acl > 0:
                self.retrieval_acl_filtered.inc(acl)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def metric_names(self) -> set[str]:
        """Every sample name this registry can expose (``_total``, ``_bucket``, ``_count``... included)."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "summary": ("_count", "_sum", "_created")}
        out: set[str] = set()
        for fam in self.registry.collect():
            out.add(fam.name)
            out.update(fam.name + s for s in suffixes.get(fam.type, ()))
        return out


_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-warden")
    except PackageNotFoundError:
        return "dev"
