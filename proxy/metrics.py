"""Prometheus metrics: counters and histograms in memory, one registry per server.

Names follow Prometheus conventions (``warden_`` prefix, base units, ``_total``
counters).  Labels are bounded: route, model (normalised to the configured
list, else ``other``), status class, stream.  Never a user or request id.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.config import MetricsConfig

# Sub-millisecond resolution for overhead; up to minutes for long generations.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """All of Warden's metrics, registered on a private registry."""

    def __init__(self, cfg: MetricsConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(cfg.models)
        self._seen: set[str] = set()
        self._children: dict[tuple[str, str, str, bool], tuple[Any, Any, Any]] = {}
        r = self.registry
        self.requests = Counter("warden_requests", "Requests handled, by route, model and status class.", ["route", "model", "status_class"], registry=r)
        self.request_duration = Histogram(
            "warden_request_duration_seconds", "Whole request latency as the client sees it.", ["route", "model", "stream"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.upstream_duration = Histogram(
            "warden_upstream_duration_seconds", "Time spent waiting on the provider, per upstream turn.", ["route", "model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "warden_time_to_first_token_seconds", "Time from request arrival to the first relayed streamed event.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.overhead = Histogram(
            "warden_overhead_seconds", "Time spent in Warden itself (request latency minus upstream time).", ["route"], buckets=OVERHEAD_BUCKETS, registry=r
        )
        self.inflight = Gauge("warden_inflight_requests", "Requests in progress on the data plane.", registry=r)
        self.upstream_errors = Counter("warden_upstream_errors", "Upstream failures by kind.", ["kind"], registry=r)
        self.tokens = Counter("warden_tokens", "Tokens reported by the provider.", ["model", "type"], registry=r)
        self.refusals = Counter("warden_refusals", "Requests Warden refused, by rule.", ["rule", "status"], registry=r)
        self.corrective_turns = Counter("warden_corrective_turns", "Corrective turns run after a refused tool call.", ["reason"], registry=r)
        self.tool_calls = Counter("warden_tool_calls", "Tool calls judged, by tool and decision.", ["tool", "decision"], registry=r)
        self.audit_records = Counter("warden_audit_records", "Audit records written.", ["kind"], registry=r)
        self.audit_write_failures = Counter("warden_audit_write_failures", "Audit records that could not be written.", registry=r)
        self.config_reloads = Counter("warden_config_reloads", "Configuration reloads, by result.", ["result"], registry=r)

    def request_children(self, route: str, model: str, status_class: str, stream: bool) -> tuple[Any, Any, Any]:
        """The labelled children for one request shape, cached (``labels()`` is slow on the hot path)."""
        key = (route, model, status_class, stream)
        hit = self._children.get(key)
        if hit is None:
            hit = (
                self.requests.labels(route=route, model=model, status_class=status_class),
                self.request_duration.labels(route=route, model=model, stream="true" if stream else "false"),
                self.overhead.labels(route=route),
            )
            self._children[key] = hit
        return hit

    def model_label(self, model: str | None) -> str:
        """``model`` if configured (or, with no list, among the first 32 seen), else ``other``."""
        if not model:
            return "none"
        if model in self._models or model in self._seen:
            return model
        if not self.cfg.models and len(self._seen) < 32 and len(model) <= 64:
            self._seen.add(model)
            return model
        return "other"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
