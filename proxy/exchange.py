"""The objects every part of Warden shares: who asks, and what happened.

An :class:`Exchange` is one application request from arrival to final answer.
Plugins read and write it through typed fields; the audit record is a
projection of it, so anything that should be explainable later must be put
here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.errors import WardenError


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: derived from a verified token (or the dev principal)."""

    tenant: str
    subject: str
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def summary(self) -> dict[str, Any]:
        """The principal as recorded in logs (no raw claims)."""
        return {"tenant": self.tenant, "subject": self.subject, "groups": sorted(self.groups), "scopes": sorted(self.scopes)}


@dataclass(slots=True)
class ToolCall:
    """One tool call emitted by the model, assembled from a message or deltas.

    ``arguments`` is the raw JSON text the model produced; ``parsed`` is set when
    it parsed as a JSON object, and ``parse_error`` says why it did not.
    """

    id: str
    name: str
    arguments: str
    index: int = 0
    parsed: dict[str, Any] | None = None
    parse_error: str | None = None


DecisionKind = Literal["allow", "deny", "repair", "hold"]


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict on a tool call, with the rule that decided.

    - ``allow``: relay the call to the application.
    - ``deny``: refuse (forbidden); ``reason`` is told to the model.
    - ``repair``: the call is invalid; ``reason`` lists what to fix.
    - ``hold``: the call waits for a human approval ``approval_id``.
    """

    kind: DecisionKind
    rule: str
    reason: str = ""
    approval_id: str | None = None
    details: dict[str, Any] | None = None

    @staticmethod
    def allow(rule: str = "default") -> Decision:
        return Decision("allow", rule)

    @staticmethod
    def deny(rule: str, reason: str, **details: Any) -> Decision:
        return Decision("deny", rule, reason, details=details or None)

    @staticmethod
    def repair(rule: str, reason: str, **details: Any) -> Decision:
        return Decision("repair", rule, reason, details=details or None)

    @staticmethod
    def hold(rule: str, reason: str, approval_id: str) -> Decision:
        return Decision("hold", rule, reason, approval_id=approval_id)


@dataclass(slots=True)
class ToolDecisionRecord:
    """A tool call and the verdict on it, as kept on the exchange."""

    turn: int
    call: ToolCall
    decision: Decision


@dataclass(slots=True)
class UpstreamTurn:
    """One request Warden sent upstream for this exchange (corrective turns add more)."""

    index: int
    body: bytes
    status: int | None = None
    response: Any = None
    started: float = 0.0
    duration_s: float | None = None
    ttft_s: float | None = None
    error: str | None = None
    reason: str = "initial"


@dataclass(slots=True)
class RetrievedChunk:
    """A chunk retrieval considered, with its scores and the ACL decision."""

    doc_id: str
    chunk_id: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    title: str = ""
    uri: str = ""
    updated_at: str | None = None
    injected: bool = False
    citation: int | None = None
    excluded_reason: str | None = None


@dataclass(slots=True)
class LocalReply:
    """A response produced by Warden itself instead of the provider.

    A request hook sets ``ex.local_reply`` (for example an idempotent replay);
    the core then skips the upstream call and sends this.  ``sse_events`` is
    used for a streaming request: each item is one event's data payload.
    """

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    sse_events: list[bytes] | None = None


@dataclass(slots=True)
class Exchange:
    """One application request from arrival to final answer."""

    request_id: str
    route: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    wall_time: float = field(default_factory=time.time)
    principal: Principal | None = None
    trace_id: str | None = None
    traceparent: str | None = None
    client_ip: str | None = None
    request_headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes = b""
    body: dict[str, Any] | None = None
    body_modified: bool = False
    stream: bool = False
    model: str | None = None
    response_model: str | None = None
    turns: list[UpstreamTurn] = field(default_factory=list)
    tool_decisions: list[ToolDecisionRecord] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    retrieval: dict[str, Any] | None = None
    retrieved: list[RetrievedChunk] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    response_body: Any = None
    response_modified: bool = False
    response_text: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    status: int | None = None
    error: WardenError | None = None
    error_detail: str | None = None
    client_disconnected: bool = False
    response_headers: dict[str, str] = field(default_factory=dict)
    local_reply: LocalReply | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    ended: float | None = None
    recorded: bool = False

    def set_body(self, body: dict[str, Any]) -> None:
        """Replace the parsed body; the core re-serializes it before sending upstream."""
        self.body = body
        self.body_modified = True

    @property
    def latency_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def upstream_s(self) -> float:
        return sum(t.duration_s or 0.0 for t in self.turns)
