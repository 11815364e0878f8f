"""Prometheus metrics: counters, histograms and gauges in memory, one registry per server.

Names follow Prometheus conventions (``warden_`` prefix, base units,
``_total`` counters: prometheus-client appends ``_total`` itself, so
``Counter("warden_requests", ...)`` is exposed as ``warden_requests_total``).
Labels are bounded: route, model (normalised, else ``other``), status class,
stream, decision, rule; never a user or request id; a tenant only with
``[metrics] tenant_label = true`` (and then bounded too).

Who updates what:

- the core, once per request of every route, from the finished
  :class:`~proxy.exchange.Exchange` (:meth:`Metrics.observe_exchange`, the
  pipeline's observe stage): requests, latencies, tokens, upstream errors
  (one per failed upstream turn), tool decisions, retrieval timings and
  citations;
- the core, where the event happens: refusals, corrective turns, audit
  records and failures, config reloads;
- plugins, for what only they know: each defines its own metrics at start
  through the ``Metrics`` object it gets as ``ctx.services["metrics"]``
  (:meth:`Metrics.counter`, :meth:`Metrics.gauge`, :meth:`Metrics.histogram`),
  either pushing values or handing over a callback read at scrape time.
  The core declares no metric on a plugin's behalf.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llm_warden.proxy.config import MetricsConfig

if TYPE_CHECKING:
    from llm_warden.proxy.exchange import Exchange, UpstreamTurn

log = logging.getLogger("warden.metrics")

# Sub-millisecond resolution for Warden's own time; up to minutes for long generations.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMMIT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
CHUNK_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)

OTHER = "other"
CallbackValue = float | Mapping[Any, float] | None
"""What a callback returns: a number (a bool or an int is one) for an unlabelled metric; for a labelled one a mapping from label value (a tuple of values for several labels) to number."""
Kind = Literal["counter", "gauge", "histogram"]

# -- upstream turn outcomes ------------------------------------------------------------

UPSTREAM_ERROR_KINDS: tuple[str, ...] = ("connection", "timeout", "status_4xx", "status_5xx", "malformed", "truncated", "stream_error")
"""The ``kind`` label of ``warden_upstream_errors_total``: why one upstream turn failed."""
CANCELLED = "cancelled"
"""A turn Warden stopped itself (the client left, or the server drained): not an upstream failure."""
_OUTCOMES = frozenset((*UPSTREAM_ERROR_KINDS, CANCELLED))


def turn_outcome(turn: UpstreamTurn, cut: str | None = None) -> str | None:
    """How one upstream turn ended: an :data:`UPSTREAM_ERROR_KINDS` kind, :data:`CANCELLED`, or ``None`` (it succeeded).

    Reads, in this order: ``turn.error_kind`` (set by the flow that saw the
    failure); ``turn.status`` (a provider 4xx/5xx is ``status_4xx`` /
    ``status_5xx``, relayed or not, on every route); and for a turn with an
    ``error`` but no kind, ``cut`` (the exchange's ``cut`` for its last turn:
    ``client`` or ``drain`` mean Warden stopped reading, ``cancelled``),
    anything else being a ``connection`` failure, so that a failure is never
    left uncounted.  A turn with neither an error status nor ``error``
    succeeded.
    """
    kind = turn.error_kind
    if kind is not None and kind in _OUTCOMES:
        return kind
    status = turn.status
    if status is not None and status >= 400:
        return "status_4xx" if status < 500 else "status_5xx"
    if turn.error is None:
        return None
    if cut == "client" or cut == "drain":
        return CANCELLED
    return "connection"


def upstream_error_kind(turn: UpstreamTurn, cut: str | None = None) -> str | None:
    """The ``warden_upstream_errors_total`` kind of a failed turn; ``None`` when it succeeded or Warden cancelled it."""
    k = turn_outcome(turn, cut)
    return None if k == CANCELLED else k


# -- bounded label values --------------------------------------------------------------


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


# -- metrics defined through the registration API ----------------------------------------

_NAME = re.compile(r"^warden_[a-z][a-z0-9_]*$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info")
_RESERVED_LABELS = frozenset({"le", "quantile"})
# A label with one of these names would carry one series per person or request.
_IDENTITY_LABELS = frozenset({"request_id", "trace_id", "span_id", "user", "user_id", "subject", "email", "ip", "client_ip", "path", "url", "api_key"})
MAX_LABELS = 4
"""Labels a defined metric may have (each bounded by ``[metrics] max_label_values``)."""
_UNITS = ("seconds", "bytes", "ratio")


class RegisteredMetric(Collector):
    """A metric defined through :meth:`Metrics.counter` / :meth:`~Metrics.gauge` / :meth:`~Metrics.histogram`.

    Values are pushed like prometheus-client's (``.inc()``, ``.set()``,
    ``.observe()``, ``.labels(...)``), with every label value bounded: past
    ``max_label_values`` distinct values per label, a value is reported as
    ``other``.  A counter or gauge may instead read a callback at each scrape
    (:meth:`set_callback`); its answer replaces the pushed values.
    """

    kind: Kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], limit: int, buckets: tuple[float, ...] | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.buckets = buckets
        self._bounds = tuple(LabelValues((), limit, 128) for _ in labelnames)
        self._push: Any
        if self.kind == "histogram":
            self._push = Histogram(name, documentation, labelnames, buckets=buckets or LATENCY_BUCKETS, registry=None)
        elif self.kind == "counter":
            self._push = Counter(name, documentation, labelnames, registry=None)
        else:
            self._push = Gauge(name, documentation, labelnames, registry=None)
        self.callback: Callable[[], CallbackValue] | None = None

    def same_shape(self, kind: Kind, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...] | None) -> bool:
        return kind == self.kind and documentation == self.documentation and labelnames == self.labelnames and (kind != "histogram" or buckets == self.buckets)

    def set_callback(self, fn: Callable[[], CallbackValue] | None) -> None:
        """Read ``fn()`` at every scrape instead of the pushed values (``None``: back to pushed values).

        ``fn`` returns a number (or bool) for an unlabelled metric, or a
        mapping from label value (a tuple for several labels) to number;
        ``None`` means "no sample now".  It runs on the event loop: read a
        field, never do I/O.  One that raises is logged and the metric is
        left out of that scrape (a scrape never fails because of it).
        """
        if fn is not None and self.kind == "histogram":
            raise TypeError(f"{self.name} is a histogram: histograms take observations, not callbacks")
        self.callback = fn

    def _bounded(self, values: Sequence[str]) -> list[str]:
        return [bound(str(v)) for bound, v in zip(self._bounds, values, strict=True)]

    def _child(self, values: tuple[str, ...], kv: dict[str, str]) -> Any:
        if kv:
            if values:
                raise ValueError(f"{self.name}: pass label values by position or by name, not both")
            if set(kv) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels are {self.labelnames}, got {tuple(kv)}")
            values = tuple(kv[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label value(s), got {len(values)}")
        return self._push.labels(*self._bounded(values))

    def describe(self) -> Iterable[Metric]:
        return self._push.describe()  # type: ignore[no-any-return]

    def collect(self) -> Iterable[Metric]:
        cb = self.callback
        if cb is None:
            return self._push.collect()  # type: ignore[no-any-return]
        try:
            value = cb()
            fam: GaugeMetricFamily | CounterMetricFamily
            fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames) if self.kind == "counter" else GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
            if value is None:
                return [fam]
            if self.labelnames:
                if not isinstance(value, Mapping):
                    raise TypeError(f"callback for labelled metric {self.name} must return a mapping")
                # Values past the label bound are summed into ``other``.
                samples: dict[tuple[str, ...], float] = {}
                for key, v in value.items():
                    labels = (key,) if isinstance(key, str) else tuple(str(k) for k in key)
                    if len(labels) != len(self.labelnames):
                        raise ValueError(f"{self.name}: {key!r} does not match labels {self.labelnames}")
                    bounded = tuple(self._bounded(labels))
                    samples[bounded] = samples.get(bounded, 0.0) + float(v)
                for labels, v in samples.items():
                    fam.add_metric(list(labels), v)
            else:
                if isinstance(value, Mapping):
                    raise TypeError(f"callback for unlabelled metric {self.name} must return a number")
                fam.add_metric([], float(value))
            return [fam]
        except Exception:
            log.exception("metrics callback for %s failed; skipping it in this scrape", self.name)
            return []


class RegisteredCounter(RegisteredMetric):
    """A counter defined through :meth:`Metrics.counter` (exposed as ``<name>_total``)."""

    kind: Kind = "counter"

    def labels(self, *values: str, **kv: str) -> Counter:
        """The child for these label values (bounded)."""
        return self._child(values, kv)  # type: ignore[no-any-return]

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to an unlabelled counter."""
        self._push.inc(amount)


class RegisteredGauge(RegisteredMetric):
    """A gauge defined through :meth:`Metrics.gauge`."""

    kind: Kind = "gauge"

    def labels(self, *values: str, **kv: str) -> Gauge:
        """The child for these label values (bounded)."""
        return self._child(values, kv)  # type: ignore[no-any-return]

    def set(self, value: float) -> None:
        self._push.set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._push.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._push.dec(amount)


class RegisteredHistogram(RegisteredMetric):
    """A histogram defined through :meth:`Metrics.histogram`."""

    kind: Kind = "histogram"

    def labels(self, *values: str, **kv: str) -> Histogram:
        """The child for these label values (bounded)."""
        return self._child(values, kv)  # type: ignore[no-any-return]

    def observe(self, value: float) -> None:
        self._push.observe(value)


_CLASSES: dict[Kind, type[RegisteredMetric]] = {"counter": RegisteredCounter, "gauge": RegisteredGauge, "histogram": RegisteredHistogram}


class Metrics:
    """Warden's metrics, registered on a private registry: the core's own, then those plugins define."""

    def __init__(self, cfg: MetricsConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        n = cfg.max_label_values
        self.model_values = LabelValues(cfg.models, n)
        self.tenant_values = LabelValues(cfg.tenants, n)
        self.tool_values = LabelValues(cfg.tools, n)
        self.retriever_values = LabelValues((), 16, 32)
        # Route names are bounded by construction (core names, operator-configured templates); this is a backstop.
        self.route_values = LabelValues((), 64, 200)
        self._children: dict[tuple[str, str, str, bool, str], tuple[Any, Any, Any]] = {}
        self._model_children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._tool_children: dict[tuple[str, str], Any] = {}
        self._retrieval_children: dict[str, Any] = {}
        self.defined: dict[str, RegisteredMetric] = {}
        """Metrics plugins defined, by name (the core's own are attributes)."""
        r = self.registry
        req_labels = ["route", "model", "status_class", "tenant"] if cfg.tenant_label else ["route", "model", "status_class"]

        # -- traffic (core, per request) ----------------------------------------------
        self.requests = Counter("warden_requests", "Requests handled, by route, model and status class (tenant with [metrics] tenant_label).", req_labels, registry=r)
        """Core (observe stage, every request)."""
        self.request_duration = Histogram(
            "warden_request_duration_seconds", "Whole request latency as the client sees it.", ["route", "model", "stream"], buckets=LATENCY_BUCKETS, registry=r
        )
        """Core (observe stage)."""
        self.upstream_duration = Histogram(
            "warden_upstream_duration_seconds", "Time spent waiting on the provider, per upstream turn.", ["route", "model"], buckets=LATENCY_BUCKETS, registry=r
        )
        """Core (observe stage, one observation per upstream turn)."""
        self.ttft = Histogram(
            "warden_time_to_first_token_seconds", "Time from request arrival to the first relayed streamed event.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        """Core (observe stage, streamed answers)."""
        self.overhead = Histogram(
            "warden_overhead_seconds", "Time spent in Warden itself (request latency minus upstream time; streams: up to the first event).", ["route"], buckets=OVERHEAD_BUCKETS, registry=r
        )
        """Core (observe stage)."""
        self.inflight = Gauge("warden_inflight_requests", "Requests in progress on the data plane.", registry=r)
        """Core (data plane, up on arrival, down when the request ends)."""
        self.upstream_errors = Counter(
            "warden_upstream_errors", "Failed upstream turns by kind (connection, timeout, status_4xx/5xx, malformed, truncated, stream_error), every route.", ["kind"], registry=r
        )
        """Core (observe stage: one per failed turn of ``ex.turns``, see :func:`upstream_error_kind`)."""
        self.tokens = Counter("warden_tokens", "Tokens reported by the provider, by model and type (prompt, completion).", ["model", "type"], registry=r)
        """Core (observe stage, from ``ex.usage``, streamed and not)."""
        self.refusals = Counter("warden_refusals", "Requests Warden refused, by rule and status.", ["rule", "status"], registry=r)
        """Core (every refusal names its rule)."""

        # -- tool calls (judged by the core's tool chain) ---------------------------------
        self.tool_calls = Counter("warden_tool_calls", "Tool calls judged, by tool and decision (allow, deny, repair, hold).", ["tool", "decision"], registry=r)
        """Core (observe stage, from ``ex.tool_decisions``: the chain's final verdict on every call)."""
        self.corrective_turns = Counter("warden_corrective_turns", "Corrective turns run after a refused tool call, by reason (deny, repair, hold).", ["reason"], registry=r)
        """Core (chat flow, per refused call that led to a corrective turn)."""

        # -- retrieval and citations (typed fields of the exchange) -----------------------
        self.retrieval_duration = Histogram(
            "warden_retrieval_duration_seconds", "Retrieval time per stage (bm25, vector, embed, fuse, fetch, total).", ["retriever"], buckets=RETRIEVAL_BUCKETS, registry=r
        )
        """Core (observe stage, from ``ex.retrieval.timings_ms`` and ``ex.timings['retrieval_s']``)."""
        self.retrieval_chunks_injected = Histogram(
            "warden_retrieval_chunks_injected", "Chunks injected into the prompt per retrieval.", buckets=CHUNK_BUCKETS, registry=r
        )
        """Core (observe stage, from ``ex.retrieval.injected`` when it searched)."""
        self.retrieval_acl_filtered = Counter("warden_retrieval_acl_filtered", "Retrieved candidates withheld because the principal may not read them.", registry=r)
        """Core (observe stage, from ``ex.retrieval.excluded['acl']``)."""
        self.citations = Counter("warden_citations", "Citations found in answers, by validity (false: a number that was never given).", ["valid"], registry=r)
        """Core (observe stage, from ``ex.citations``)."""

        # -- audit ---------------------------------------------------------------------
        self.audit_records = Counter("warden_audit_records", "Audit records written, by kind (exchange, admin actions...).", ["kind"], registry=r)
        """Core (after each record is accepted)."""
        self.audit_write_failures = Counter("warden_audit_write_failures", "Audit records that could not be written.", registry=r)
        """Core."""
        self.audit_queue_depth = self._new("gauge", "warden_audit_queue_depth", "Records waiting in the audit queue (batch durability).", (), None)
        """Audit store (callback bound by :meth:`bind_audit`: its ``queue_depth``)."""
        self.audit_writer_restarts = self._new("counter", "warden_audit_writer_restarts", "Times the audit writer had to be started again (SQLite: its writer process; PostgreSQL: its writer connection).", (), None)
        """Audit store (callback bound by :meth:`bind_audit`: its ``writer_restarts``)."""
        self.audit_commit_duration = Histogram(
            "warden_audit_commit_duration_seconds", "Duration of one audit commit (a group of records in batch mode).", buckets=COMMIT_BUCKETS, registry=r
        )
        """Audit store (its ``on_commit(seconds, records)`` hook, bound by :meth:`bind_audit`)."""

        # -- operations ----------------------------------------------------------------
        self.config_reloads = Counter("warden_config_reloads", "Configuration reloads, by result (applied, refused).", ["result"], registry=r)
        """Core."""
        self.build_info = Gauge("warden_build_info", "Always 1; the labels say which Warden runs.", ["version"], registry=r)
        """Core (set once)."""
        self.build_info.labels(version=_version()).set(1)
        # Series that alerts and ratios divide by exist from the first scrape, at zero.
        self._upstream_error_children = {kind: self.upstream_errors.labels(kind=kind) for kind in UPSTREAM_ERROR_KINDS}
        self._citation_children = (self.citations.labels(valid="true"), self.citations.labels(valid="false"))
        for result in ("applied", "refused"):
            self.config_reloads.labels(result=result)
        self.audit_records.labels(kind="exchange")
        self._core_names = frozenset(self.metric_names())

    # -- registration API (plugins) ------------------------------------------------------

    def counter(self, name: str, documentation: str, labels: Sequence[str] = (), *, callback: Callable[[], CallbackValue] | None = None) -> RegisteredCounter:
        """Define a counter (exposed as ``<name>_total``) and return it.

        ``name`` starts with ``warden_`` (a trailing ``_total`` is dropped, as
        prometheus-client does); ``documentation`` is its HELP text;
        ``labels`` are at most :data:`MAX_LABELS` label names, never an
        identity (user, subject, request id, path...), each value bounded by
        ``[metrics] max_label_values``.  ``callback``: a count the caller
        already keeps, read at every scrape (it must only grow; see
        :meth:`RegisteredMetric.set_callback`).  Defining the same name again
        with the same shape returns the existing metric (a plugin restarted);
        with another shape, or a name the core or another plugin holds, it
        raises ``ValueError``.
        """
        if name.endswith("_total"):
            name = name[: -len("_total")]
        m = self._define("counter", name, documentation, tuple(labels), None)
        if callback is not None:
            m.set_callback(callback)
        return m  # type: ignore[return-value]

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = (), *, callback: Callable[[], CallbackValue] | None = None) -> RegisteredGauge:
        """Define a gauge and return it; ``callback`` reads a value the caller keeps at every scrape (see :meth:`counter`)."""
        m = self._define("gauge", name, documentation, tuple(labels), None)
        if callback is not None:
            m.set_callback(callback)
        return m  # type: ignore[return-value]

    def histogram(self, name: str, documentation: str, labels: Sequence[str] = (), *, buckets: Sequence[float] = LATENCY_BUCKETS) -> RegisteredHistogram:
        """Define a histogram and return it (name in base units, e.g. ``_seconds``; see :meth:`counter` for the rules)."""
        b = tuple(float(x) for x in buckets)
        if not b or list(b) != sorted(set(b)):
            raise ValueError(f"{name}: buckets must be a non-empty increasing sequence")
        return self._define("histogram", name, documentation, tuple(labels), b)  # type: ignore[return-value]

    def _define(self, kind: Kind, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...] | None) -> RegisteredMetric:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"metric name {name!r} must be lower-case snake_case starting with 'warden_'")
        if name.endswith(_RESERVED_SUFFIXES):
            raise ValueError(f"metric name {name!r} ends with a suffix Prometheus reserves ({', '.join(_RESERVED_SUFFIXES)})")
        if not isinstance(documentation, str) or not documentation.strip():
            raise ValueError(f"{name}: documentation (the HELP text) is required")
        if len(labels) > MAX_LABELS:
            raise ValueError(f"{name}: at most {MAX_LABELS} labels")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{name}: a label is named twice")
        for label in labels:
            if not isinstance(label, str) or not _LABEL.match(label) or label in _RESERVED_LABELS:
                raise ValueError(f"{name}: {label!r} is not a valid label name")
            if label in _IDENTITY_LABELS:
                raise ValueError(f"{name}: label {label!r} would make one series per person or request")
        have = self.defined.get(name)
        if have is not None:
            if have.same_shape(kind, documentation, labels, buckets):
                return have
            raise ValueError(f"metric {name} is already defined with another type, help text, labels or buckets")
        m = self._new(kind, name, documentation, labels, buckets)
        self.defined[name] = m
        return m

    def _new(self, kind: Kind, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...] | None) -> RegisteredMetric:
        m = _CLASSES[kind](name, documentation, labels, self.cfg.max_label_values, buckets)
        try:
            self.registry.register(m)
        except ValueError:
            raise ValueError(f"metric {name} clashes with a metric already defined") from None
        return m

    # Names as plugins passed them before they defined their own metrics: ``"x_pending"`` or
    # ``"warden_x_pending"``; a base unit suffix may be left out (``"x_lag"`` -> ``warden_x_lag_seconds``).
    def _resolve(self, name: str, kind: Kind) -> RegisteredMetric | None:
        full = name if name.startswith("warden_") else f"warden_{name}"
        candidates = [full, *(f"{full}_{u}" for u in _UNITS)]
        found = [self.defined[c] for c in candidates if c in self.defined]
        if len(found) > 1:
            raise KeyError(f"{name!r} is ambiguous: {', '.join(m.name for m in found)}")
        if not found:
            if any(c in self._core_names for c in candidates) or isinstance(getattr(self, name, None), (Counter, Gauge, Histogram, RegisteredMetric)):
                raise KeyError(f"{name!r} is a core metric: only metrics a plugin defined take callbacks")
            # Not raised: a plugin that still relies on the core declaring its metrics keeps starting.
            log.warning("metric %r is not defined (define it with metrics.%s(name, documentation, callback=...)); its callback is not exposed", name, kind)
            return None
        m = found[0]
        if m.kind != kind:
            raise KeyError(f"{m.name} is a {m.kind}: use register_{m.kind}_callback")
        return m

    def register_gauge_callback(self, name: str, fn: Callable[[], CallbackValue]) -> bool:
        """Read ``fn()`` at every scrape for a gauge a plugin defined with :meth:`gauge`; ``False`` when none is defined (logged).

        ``name`` is the metric name, with or without ``warden_`` and its unit
        suffix.  Prefer ``metrics.gauge(name, documentation, callback=fn)``.
        Raises ``KeyError`` for a core metric or a counter.
        """
        m = self._resolve(name, "gauge")
        if m is None:
            return False
        m.set_callback(fn)
        return True

    def register_counter_callback(self, name: str, fn: Callable[[], CallbackValue]) -> bool:
        """Like :meth:`register_gauge_callback`, for a counter a plugin defined with :meth:`counter` (values must only grow)."""
        m = self._resolve(name, "counter")
        if m is None:
            return False
        m.set_callback(fn)
        return True

    def bind_audit(self, audit: Any) -> None:
        """Read the audit store's queue depth at scrape time and time its commits.

        Uses what the store offers: ``queue_depth`` and ``writer_restarts``
        attributes or properties, and an ``on_commit(seconds, records)`` hook slot.
        """
        if audit is None:
            return
        if hasattr(audit, "queue_depth"):
            self.audit_queue_depth.set_callback(lambda: float(audit.queue_depth))
        if hasattr(audit, "writer_restarts"):
            self.audit_writer_restarts.set_callback(lambda: float(audit.writer_restarts))
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
        """Count one finished exchange of any route; returns the upstream time it spent (seconds).

        The pipeline's observe stage calls this once per request, so every
        route is counted the same way: requests and latency, each upstream
        turn's duration and, for a failed turn, one ``warden_upstream_errors_total``
        by kind (:func:`upstream_error_kind`), tokens, tool verdicts,
        retrieval and citations.
        """
        model = self.model_values(ex.model)
        route = self.route_values(ex.route)
        requests, duration, overhead = self.request_children(route, model, _STATUS_CLASS.get(status // 100, "other"), ex.stream, ex.principal.tenant if ex.principal else None)
        requests.inc()
        duration.observe(total_s)
        upstream = 0.0
        turns = ex.turns
        usage = ex.usage
        ttft_h = None
        if turns or usage is not None:
            up_h, ttft_h, prompt_c, completion_c = self.model_children(route, model)
            last = len(turns) - 1
            for i, t in enumerate(turns):
                if t.duration_s is not None:
                    upstream += t.duration_s
                    up_h.observe(t.duration_s)
                kind = upstream_error_kind(t, ex.cut if i == last else None)
                if kind is not None:
                    self._upstream_error_children[kind].inc()
            if usage is not None:
                if usage.prompt_tokens > 0:
                    prompt_c.inc(usage.prompt_tokens)
                if usage.completion_tokens > 0:
                    completion_c.inc(usage.completion_tokens)
        if ex.stream:
            # In a stream the client's reading pace is part of the total; count Warden's time to first byte instead.
            ttft = ex.timings.get("ttft")
            if ttft is not None:
                if ttft_h is None:
                    ttft_h = self.model_children(route, model)[1]
                ttft_h.observe(ttft)
                first = turns[0].ttft_s if turns and turns[0].ttft_s is not None else ttft
                overhead.observe(max(ttft - first, 0.0))
        else:
            overhead.observe(max(total_s - upstream, 0.0))
        if ex.tool_decisions:
            for d in ex.tool_decisions:
                key = (self.tool_values(d.call.name, "(unnamed)"), d.decision.kind)
                child = self._tool_children.get(key)
                if child is None:
                    child = self._tool_children[key] = self.tool_calls.labels(tool=key[0], decision=key[1])
                child.inc()
        if ex.retrieval is not None:
            self._observe_retrieval(ex)
        if ex.citations:
            valid = sum(1 for c in ex.citations if c.valid)
            if valid:
                self._citation_children[0].inc(valid)
            if len(ex.citations) > valid:
                self._citation_children[1].inc(len(ex.citations) - valid)
        return upstream

    def _retrieval_child(self, stage: str) -> Any:
        label = self.retriever_values(stage)
        child = self._retrieval_children.get(label)
        if child is None:
            child = self._retrieval_children[label] = self.retrieval_duration.labels(retriever=label)
        return child

    def _observe_retrieval(self, ex: Exchange) -> None:
        r = ex.retrieval
        assert r is not None
        for stage, ms in r.timings_ms.items():
            if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0:
                self._retrieval_child(stage).observe(ms / 1000.0)
        if "total" not in r.timings_ms:
            total = ex.timings.get("retrieval_s")
            if total is not None:
                self._retrieval_child("total").observe(total)
        if r.skipped is None:
            self.retrieval_chunks_injected.observe(r.injected)
        acl = r.excluded.get("acl")
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
