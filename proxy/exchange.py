"""The objects every part of Warden shares: who asks, and what happened.

An :class:`Exchange` is one application request from arrival to final answer.
Plugins read and write it through typed fields; the audit record is a
projection of it, so anything that should be explainable later must be put
here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from llm_warden.proxy.errors import WardenError

T = TypeVar("T")


class StateKey(Generic[T]):
    """A typed slot for one plugin's per-exchange state (in the spirit of aiohttp's ``AppKey``).

    Declared once at module level by the plugin that owns it::

        STATE = StateKey("tools", ToolState)
        st = ex.slots.setdefault(STATE, ToolState)

    Slots are private to their owner: the audit record never serialises
    them.  What a plugin wants recorded it returns from
    :meth:`~proxy.plugin.Plugin.audit_fields`.
    """

    __slots__ = ("name", "type")

    def __init__(self, name: str, t: type[T]) -> None:
        self.name = name
        self.type = t

    def __repr__(self) -> str:
        return f"<StateKey {self.name}: {self.type.__qualname__}>"


class Slots:
    """The typed slots of one exchange (see :class:`StateKey`)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StateKey[Any], Any] = {}

    def get(self, key: StateKey[T]) -> T | None:
        return cast("T | None", self._values.get(key))

    def __getitem__(self, key: StateKey[T]) -> T:
        return cast(T, self._values[key])

    def __setitem__(self, key: StateKey[T], value: T) -> None:
        self._values[key] = value

    def __contains__(self, key: StateKey[Any]) -> bool:
        return key in self._values

    def setdefault(self, key: StateKey[T], factory: Callable[[], T]) -> T:
        v = self._values.get(key)
        if v is None:
            v = self._values[key] = factory()
        return cast(T, v)

    def pop(self, key: StateKey[T]) -> T | None:
        return cast("T | None", self._values.pop(key, None))


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
    legacy: bool = False
    """A legacy ``function_call`` (not an entry of ``tool_calls``)."""
    server: str | None = None
    """The MCP server whose tool is called (``/mcp/{server}``); ``None``: a function the model calls in chat.
    A tool policy resolves the tool by (name, server): the same name on two servers, or in chat, is three tools."""


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


@dataclass(frozen=True, slots=True)
class ToolOffer:
    """Whether a tool may be shown to this principal now, before any call (MCP ``tools/list``).

    ``allowed`` false: hidden, ``rule`` and ``reason`` say why.  Allowed: the
    policy's ``effect``, its argument ``schema`` (what is enforced, so what
    the caller is shown), its ``description`` override (``""``: keep the
    upstream's) and, for a deprecated version, ``deprecation`` (contract,
    sunset, replacement, and the ``note`` that heads the description shown).
    """

    name: str
    allowed: bool
    rule: str
    reason: str = ""
    effect: str = "write"
    schema: dict[str, Any] | None = None
    description: str = ""
    deprecation: dict[str, Any] | None = None


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
    error_kind: str | None = None
    """How the turn failed, for metrics: ``timeout``, ``connection``, ``status_4xx``, ``status_5xx``, ``malformed``, ``truncated``, ``stream_error``."""
    payload: Any = None
    """``body`` parsed, when Warden built it (so the record never parses it again)."""
    span_id: str = ""
    """The span id sent upstream in this turn's ``traceparent`` (the turn's CLIENT span)."""


@dataclass(slots=True)
class Usage:
    """Tokens the provider reported for the exchange, summed over its turns."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, reported: Any) -> None:
        """Add a provider ``usage`` object (non-integers and booleans are ignored)."""
        if not isinstance(reported, dict):
            return
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            v = reported.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}


@dataclass(slots=True)
class RetrievalSummary:
    """What retrieval did for the exchange (the chunks themselves are ``Exchange.retrieved``).

    ``skipped`` names why it did not search (``header``, ``no_documents``,
    ``no_query``, ``error``...); ``None`` when it searched.
    """

    skipped: str | None = None
    query: str | None = None
    mode: str | None = None
    top_k: int | None = None
    candidates: int | None = None
    injected: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    context_tokens: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The summary as recorded (``None`` fields left out)."""
        out: dict[str, Any] = {}
        for k in ("skipped", "query", "mode", "top_k", "candidates", "context_tokens", "error"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.skipped is None:
            out["injected"] = self.injected
            out["excluded"] = dict(self.excluded)
            out["timings_ms"] = dict(self.timings_ms)
        return out


CITATION_MARKER = re.compile(r"\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")
"""A citation marker in an answer: ``[n]``, ``[1, 3]`` (retrieval maps them to documents; adapters place them)."""


@dataclass(frozen=True, slots=True)
class Citation:
    """One ``[n]`` marker of the answer, mapped back to the document it cites (``valid`` false: never given)."""

    n: int
    valid: bool
    doc_id: str | None = None
    chunk_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "valid": self.valid, "doc_id": self.doc_id, "chunk_id": self.chunk_id}


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
    """One application request from arrival to final answer.

    The core's typed fields are what the audit record, metrics and traces
    read.  Plugin-private state lives in ``slots`` (see :class:`StateKey`);
    what a plugin wants recorded comes from its ``audit_fields`` hook and
    lands in ``plugin_fields`` at the record stage.
    """

    request_id: str
    route: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    wall_time: float = field(default_factory=time.time)
    protocol: str = "openai.chat"
    """The API of the route: ``openai.chat``, ``anthropic.messages``, ``openai.responses``, ``openai.embeddings``, ``openai.models``, ``warden.feedback``, ``passthrough``, ``mcp``."""
    phase: str = "identify"
    """The pipeline stage the exchange is in (see :mod:`proxy.pipeline`)."""
    principal: Principal | None = None
    trace_id: str | None = None
    traceparent: str | None = None
    client_ip: str | None = None
    client_request_id: str | None = None
    """The caller's ``x-request-id`` when it was refused as an id (recorded redacted)."""
    request_headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes = b""
    client_body: dict[str, Any] | None = None
    """The body as the client sent it, parsed once, in the internal chat shape (for another API,
    its adapter's translation, before any hook); never changed by hooks."""
    body: dict[str, Any] | None = None
    """The body as it goes upstream: ``client_body`` until a hook calls :meth:`set_body`."""
    body_modified: bool = False
    body_refused: str | None = None
    """The rule under which the body was refused unparsed (recorded by size and digest only)."""
    stream: bool = False
    model: str | None = None
    response_model: str | None = None
    turns: list[UpstreamTurn] = field(default_factory=list)
    tools_offered: frozenset[str] | None = None
    """Tool names offered to the model after every request hook ran (``None``: no tools offered)."""
    tools_withheld: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Tools the client offered that a request hook removed before the upstream call: name → (rule, reason).

    A call to one of them is refused with that rule and reason (the model
    learns why), not merely as "not offered"."""
    max_corrections: int = 2
    tool_decisions: list[ToolDecisionRecord] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    retrieval: RetrievalSummary | None = None
    retrieved: list[RetrievedChunk] = field(default_factory=list)
    citations: list[Citation] = field(default_factory=list)
    prompt_template_sha256: str | None = None
    response_body: Any = None
    response_modified: bool = False
    response_text: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    usage: Usage | None = None
    status: int | None = None
    error: WardenError | None = None
    error_detail: str | None = None
    client_disconnected: bool = False
    cut: str | None = None
    """Why a started stream ended before its answer was whole (``client``, ``drain``, ``upstream``, ``refused``)."""
    relayed_events: int = 0
    relayed_bytes: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    local_reply: LocalReply | None = None
    mcp: dict[str, Any] | None = None
    """What the MCP gateway did (server, method, tool, session, decision, result digest), recorded as ``mcp``."""
    slots: Slots = field(default_factory=Slots)
    plugin_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    ended: float | None = None

    def set_body(self, body: dict[str, Any]) -> None:
        """Replace the parsed body; the core re-serializes it before sending upstream."""
        self.body = body
        self.body_modified = True

    def add_usage(self, reported: Any) -> None:
        """Add a provider-reported ``usage`` object to the exchange's total."""
        if not isinstance(reported, dict):
            return
        if self.usage is None:
            self.usage = Usage()
        self.usage.add(reported)

    @property
    def latency_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def upstream_s(self) -> float:
        return sum(t.duration_s or 0.0 for t in self.turns)
