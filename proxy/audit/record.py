"""The audit record: a projection of an :class:`~proxy.exchange.Exchange`.

Nothing is recorded that is not on the exchange.  Content (messages as sent
upstream, model answers, tool-call arguments, tool results, feedback text) is
stored per ``[audit] store_content``:

- ``full``: as sent, with secrets and ``redact_patterns`` removed;
- ``redacted``: as ``full``, and the PII kinds of ``redact_pii`` removed too;
- ``hashes``: only ``{"sha256", "bytes"}`` of the redacted content.

Metadata (principal, route, model, parameters, decisions, usage, timings) is
always stored, with secrets removed.  Warden's own durations are integer
microseconds; every record says which redaction rules fired (names and
counts, never values).

Record kinds: ``exchange``; admin actions named by whoever records them
(``config_reload``, ``retention_prune``, ``tools.mode``,
``tools.approval.approve``/``deny``, ``retrieval.ingest``/``delete``) and
``feedback``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson

from llm_warden.proxy.audit.chain import canonical
from llm_warden.proxy.audit.redact import Redactor, scan_bytes
from llm_warden.proxy.exchange import Exchange

if TYPE_CHECKING:
    from llm_warden.proxy.config import AuditConfig

ContentMode = Literal["full", "redacted", "hashes"]
RECORD_VERSION = 1
_KIND = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_DROP_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "openai-api-key"})
_SAMPLING = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "tool_choice",
    "response_format",
    "reasoning_effort",
    "stream_options",
    "user",
    "service_tier",
)
_SAMPLING_SET = frozenset(_SAMPLING)


class RecordStageError(RuntimeError):
    """An exchange was handed to the audit log outside the pipeline's record stage (a programming error)."""


@dataclass(slots=True)
class Prepared:
    """A record ready for the chain: its canonical bytes and the indexed columns."""

    kind: str
    ts_us: int
    request_id: str | None
    tenant: str | None
    subject: str | None
    tools: str | None
    call_ids: str | None
    status: int | None
    body: bytes


class Projector:
    """Builds records from exchanges and events with one configured redaction policy."""

    def __init__(
        self,
        mode: ContentMode,
        *,
        patterns: dict[str, str] | None = None,
        pii: list[str] | None = None,
        upstream_key: str | None = None,
        secrets: Iterable[str] = (),
        provider: str | None = None,
        tool_result_max_bytes: int = 16384,
    ) -> None:
        self.mode = mode
        self.provider = provider
        self.tool_result_max_bytes = tool_result_max_bytes
        # Content gets every rule; metadata (``pii=False``) the secret and custom rules only.
        # ``secrets``: every other secret Warden holds, removed by value in every mode (rule ``secret_value``).
        self.redactor = Redactor(patterns=patterns, pii=pii or [], apply_pii=mode != "full", upstream_key=upstream_key, secrets=secrets)
        self._system_hashes = _HashCache()

    @classmethod
    def for_audit(cls, cfg: AuditConfig, *, upstream_key: str | None, secrets: Iterable[str], provider: str | None) -> Projector:
        """The projector an audit store builds from ``[audit]`` (the same for every backend)."""
        return cls(
            cfg.store_content,
            patterns=cfg.redact_patterns,
            pii=cfg.redact_pii,
            upstream_key=upstream_key,
            secrets=secrets,
            provider=provider,
            tool_result_max_bytes=cfg.tool_result_max_bytes,
        )

    # -- content -------------------------------------------------------------

    def _contents(self, items: list[Any], counts: dict[str, int]) -> list[Any]:
        """Redact content items; each is serialized once (see :meth:`_stored`)."""
        return self._stored(*self.redactor.values(items, counts))

    def _stored(self, red: list[Any], parts: list[bytes] | None) -> list[Any]:
        """Content items as stored, from :meth:`Redactor.values`.

        When nothing could be redacted, the canonical bytes made for the scan
        go into the record as they are (``orjson.Fragment``: the stored bytes
        are the same as serializing the item again) and are what a dict's
        hash covers in ``hashes`` mode.
        """
        if self.mode != "hashes":
            return list(map(orjson.Fragment, parts)) if parts is not None else red
        out: list[Any] = []
        for i, v in enumerate(red):
            if v is None:
                out.append(None)
                continue
            if isinstance(v, str):
                b = v.encode()
            elif isinstance(v, dict):
                b = parts[i] if parts is not None else canonical(v)
            else:
                b = orjson.dumps(v)
            out.append({"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)})
        return out

    # -- exchange ------------------------------------------------------------

    def exchange(self, ex: Exchange) -> Prepared:
        """Project a finished exchange into a prepared record.

        Each content item is serialized once (canonical bytes) and the
        metadata once; one automaton pass over both finds the rules that can
        fire in each (:meth:`Redactor.record_scopes`).  In the common record
        none can: the content bytes go into the record as they are and the
        metadata is stored as built.
        """
        if ex.phase != "record":
            raise RecordStageError(f"exchange {ex.request_id} is in stage {ex.phase!r}: only the pipeline's record stage records an exchange")
        try:
            return self._exchange(ex, scrub=False)
        except (TypeError, ValueError, RecursionError):
            # A value the record cannot hold as it is (undecodable text, nesting past the serializer's
            # limit): the same record, every value made storable, so the exchange is still fully recorded.
            return self._exchange(ex, scrub=True)

    def _exchange(self, ex: Exchange, scrub: bool) -> Prepared:
        counts: dict[str, int] = {}
        ex_turns = ex.turns
        body = ex.body
        # Content items: each turn's request (the object Warden sent, never parsed again) and response,
        # then the tool-call arguments, the tool results, the answer text and the final response body.
        items: list[Any] = []
        for t in ex_turns:
            items.append(t.payload if t.payload is not None else _parse(t.body))
            items.append(t.response)
        if ex.body_refused is not None:
            items.append(_refused_body(ex.body_refused, ex.raw_body))
        first = items[0] if items and isinstance(items[0], dict) else (body or {})
        client = ex.client_body or {}
        results = ex.tool_results or _tool_results_from(client)
        last_resp = ex_turns[-1].response if ex_turns else None
        resp_body = None if ex.response_body is last_resp else ex.response_body

        decisions = ex.tool_decisions
        for d in decisions:
            items.append(d.call.arguments)
        limit = self.tool_result_max_bytes
        result_meta: list[dict[str, Any]] = []
        for r in results:
            content = r.get("content")
            text = content if isinstance(content, str) else orjson.dumps(content).decode()
            raw = text.encode()
            n = len(raw)
            result_meta.append({"tool_call_id": r.get("tool_call_id"), "name": r.get("name"), "bytes": n, "truncated": n > limit})
            items.append(raw[:limit].decode("utf-8", "ignore") if n > limit else text)
        items.append(ex.response_text)
        items.append(resp_body)
        if scrub:
            items = [_scrub(v, 0) for v in items]
        try:
            # canonical()'s fast path for all items at once (the same bytes); any item that needs more takes canonical().
            parts = [orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in items]
        except TypeError:
            parts = [canonical(v) for v in items]

        # The entries that hold content are built before the metadata and get their content after the scan.
        turns: list[dict[str, Any]] = []
        for t in ex_turns:
            turns.append(
                {
                    "index": t.index,
                    "reason": t.reason,
                    "status": t.status,
                    "duration_us": _us(t.duration_s),
                    "ttft_us": _us(t.ttft_s),
                    "error": t.error,
                    "error_kind": t.error_kind,
                    "span_id": t.span_id or None,
                }
            )
        calls: list[dict[str, Any]] = []
        names: set[str] = set()
        ids: list[str] = []
        for d in decisions:
            call, dec = d.call, d.decision
            calls.append(
                {
                    "turn": d.turn,
                    "id": call.id,
                    "name": call.name,
                    "index": call.index,
                    "parse_error": call.parse_error,
                    "decision": dec.kind,
                    "rule": dec.rule,
                    "reason": dec.reason,
                    "approval_id": dec.approval_id,
                    "details": dec.details,
                }
            )
            if call.server is not None:
                calls[-1]["server"] = call.server
            names.add(call.name)
            ids.append(call.id)
        response: dict[str, Any] = {"finish_reasons": list(ex.finish_reasons)}

        p = ex.principal
        err = ex.error
        tools_sent = _tool_names(first)
        msgs = first.get("messages")
        meta: dict[str, Any] = {
            "request_id": ex.request_id,
            "client_request_id": ex.client_request_id,
            "trace_id": ex.trace_id,
            "protocol": ex.protocol,
            "route": ex.route,
            "method": ex.method,
            "path": ex.path,
            "client_ip": ex.client_ip,
            "principal": p.summary() if p is not None else None,
            "provider": self.provider,
            "model": {"requested": ex.model, "reported": ex.response_model},
            "stream": ex.stream,
            "params": _params(client, first, tools_sent),
            "tools_withheld": {name: rule for name, (rule, _) in ex.tools_withheld.items()},
            "prompt": {
                "system_sha256": _system_hash(first, self._system_hashes),
                "template_sha256": ex.prompt_template_sha256,
                "messages": len(msgs) if isinstance(msgs, list) else None,
            },
            "retrieval": ex.retrieval.as_dict() if ex.retrieval is not None else None,
            "retrieved": [_chunk(r) for r in ex.retrieved] if ex.retrieved else [],
            "citations": [c.as_dict() for c in ex.citations],
            "usage": ex.usage.as_dict() if ex.usage is not None else None,
        }
        # Built in the order the keys always had (what scan_bytes() sees) and the values were always evaluated.
        meta["latency_us"] = {
            "total": _us(ex.latency_s),
            "upstream": _us(ex.upstream_s) if ex_turns else None,
            "ttft": _us(ex_turns[0].ttft_s) if ex_turns else None,
        }
        meta["timings_us"] = {k: _us(v) for k, v in ex.timings.items()} if ex.timings else {}
        meta["status"] = ex.status
        meta["error"] = (
            {"status": err.status, "type": err.type, "code": err.code, "rule": err.rule, "message": err.message}
            if err is not None
            else None
        )
        meta["error_detail"] = ex.error_detail
        meta["client_disconnected"] = ex.client_disconnected
        meta["stream_end"] = {"cut": ex.cut, "events": ex.relayed_events, "bytes": ex.relayed_bytes} if ex.stream else None
        meta["request_headers"] = {k: v for k, v in ex.request_headers.items() if k.lower() not in _DROP_HEADERS}
        meta["response_headers"] = ex.response_headers
        meta["plugins"] = ex.plugin_fields
        if ex.mcp is not None:
            meta["mcp"] = ex.mcp
        if scrub:
            meta = _scrub(meta, 0)
        redactor = self.redactor
        meta_scope, content_scope = redactor.record_scopes(scan_bytes(meta), parts)
        stored = self._stored(*redactor.values_in(items, parts, content_scope, counts))
        i = 0
        for entry in turns:
            entry["request"] = stored[i]
            entry["response"] = stored[i + 1]
            i += 2
        for entry in calls:
            entry["arguments"] = stored[i]
            i += 1
        for entry in result_meta:
            entry["content"] = stored[i]
            i += 1
        if ex.body_refused is not None:
            record_request = stored[i]
            i += 1
        else:
            record_request = None
        response["text"] = stored[i]
        response["body"] = stored[i + 1]

        # Free text the core and plugins write about the exchange: an upstream error may quote the key, a
        # schema refusal may quote the argument it refused. Redacted like content (PII too, per mode),
        # one scan for all of them, and only when there is any.
        free: list[tuple[dict[str, Any], str]] = []
        for e in turns:
            if e["error"]:
                free.append((e, "error"))
        for e in calls:
            if e["reason"]:
                free.append((e, "reason"))
            if e["details"]:
                free.append((e, "details"))
            if e["parse_error"]:
                free.append((e, "parse_error"))
        for e in result_meta:
            if e["name"]:
                free.append((e, "name"))
        if free:
            red = redactor.value([e[k] for e, k in free], counts)
            for (e, k), v in zip(free, red, strict=True):
                e[k] = v

        # The (redacted) metadata dict is ours, so it becomes the record rather than being copied into one
        # (stored with sorted keys: the order of insertion does not matter).
        record: dict[str, Any] = redactor.value_in(meta, meta_scope, counts)
        ts_us = int(ex.wall_time * 1_000_000)
        record["v"] = RECORD_VERSION
        record["kind"] = "exchange"
        record["ts"] = _iso(ts_us)
        record["ts_us"] = ts_us
        record["tools_sent"] = tools_sent
        record["turns"] = turns
        record["tool_calls"] = calls
        record["tool_results"] = result_meta
        record["response"] = response
        record["refused_request"] = record_request
        record["redaction"] = {"mode": self.mode, "rules": counts}
        rid = record.get("request_id")
        return Prepared(
            "exchange",
            ts_us,
            # The indexed id is the stored one: an id the redactor changed is indexed as stored, so verify agrees.
            rid if isinstance(rid, str) else ex.request_id,
            p.tenant if p else None,
            p.subject if p else None,
            f",{','.join(sorted(names))}," if names else None,
            f",{','.join(ids)}," if ids else None,
            ex.status,
            canonical(record),
        )

    # -- events --------------------------------------------------------------

    def event(self, kind: str, actor: dict[str, Any], data: dict[str, Any], *, ts: float) -> Prepared:
        """Project an admin action or a feedback into a prepared record."""
        if not _KIND.match(kind) or kind == "exchange":
            raise ValueError(f"invalid audit record kind {kind!r}")
        counts: dict[str, int] = {}
        red_actor = self.redactor.value(actor, counts, pii=False)
        if kind == "feedback":
            free = {k: data.get(k) for k in ("comment", "correction")}
            fixed = {k: v for k, v in data.items() if k not in free}
            comment, correction = self._contents([free["comment"], free["correction"]], counts)
            red_data = {**self.redactor.value(fixed, counts, pii=False), "comment": comment, "correction": correction}
        else:
            red_data = self.redactor.value(data, counts)
        ts_us = int(ts * 1_000_000)
        record = {
            "v": RECORD_VERSION,
            "kind": kind,
            "ts": _iso(ts_us),
            "ts_us": ts_us,
            "actor": red_actor,
            "data": red_data,
            "redaction": {"mode": self.mode, "rules": counts},
        }
        rid = data.get("request_id")
        return Prepared(
            kind=kind,
            ts_us=ts_us,
            request_id=rid if isinstance(rid, str) else None,
            tenant=_str(red_actor.get("tenant")),
            subject=_str(red_actor.get("subject")),
            tools=None,
            call_ids=None,
            status=None,
            body=canonical(record),
        )


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _us(seconds: float | None) -> int | None:
    return None if seconds is None else int(round(seconds * 1_000_000))


_iso_second: tuple[int, str] = (-1, "")


def _iso(ts_us: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``; the part up to the second is formatted once per second."""
    global _iso_second
    sec, us = divmod(ts_us, 1_000_000)
    cached = _iso_second
    if cached[0] == sec:
        return f"{cached[1]}.{us:06d}Z"
    if not 0 <= sec < 253402300800:
        return datetime.fromtimestamp(ts_us / 1_000_000, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    _iso_second = (sec, head)
    return f"{head}.{us:06d}Z"


def _parse(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


_SCRUB_DEPTH = 64


def _scrub(v: Any, depth: int) -> Any:
    """``v`` made storable: text escaped where it cannot be encoded, nesting past a bound replaced by its size."""
    t = type(v)
    if t is str:
        try:
            v.encode()
            return v
        except UnicodeEncodeError:
            return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if t is int:
        return v if -(2**63) <= v < 2**64 else str(v)
    if v is None or t is bool or t is float:
        return v
    if depth >= _SCRUB_DEPTH:
        return {"unrecorded": "nesting past the record's bound", "type": t.__name__}
    if t is dict:
        return {_scrub(str(k), depth): _scrub(x, depth + 1) for k, x in v.items()}
    if t is list or t is tuple:
        return [_scrub(x, depth + 1) for x in v]
    if isinstance(v, orjson.Fragment):
        return v
    return {"unrecorded": "not a JSON value", "type": t.__name__}


def _refused_body(rule: str, raw: bytes) -> dict[str, Any]:
    """A request body Warden refused to parse: its size and digest, never its bytes."""
    return {"refused": rule, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _tool_names(body: dict[str, Any]) -> list[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    out = []
    for t in tools:
        if isinstance(t, dict):
            fn = t.get("function")
            name = fn.get("name") if isinstance(fn, dict) else t.get("name")
            if isinstance(name, str):
                out.append(name)
    return out


def _params(client: dict[str, Any], sent: dict[str, Any], tools_sent: list[str]) -> dict[str, Any]:
    """The sampling parameters sent upstream and the tool names the client offered.

    (Key order does not matter: the record is stored with sorted keys.)
    """
    if len(sent) < len(_SAMPLING):
        out: dict[str, Any] = {k: v for k, v in sent.items() if k in _SAMPLING_SET}
    else:
        out = {k: sent[k] for k in _SAMPLING if k in sent}
    out["tools_offered"] = list(tools_sent) if client is sent else _tool_names(client)
    return out


class _HashCache:
    """SHA-256 hex digests of recent texts, keyed by the text itself (so never stale).

    System prompts repeat across requests; hashing one again (OpenSSL's
    per-call setup, then the text) costs several times the dict look-up.
    Bounded in entries and in the characters held: when either bound would
    be passed, the cache is emptied and starts over.
    """

    MAX_ENTRIES = 256
    MAX_CHARS = 1 << 20

    __slots__ = ("digests", "chars")

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.chars = 0

    def sha256(self, text: str) -> str:
        digest = self.digests.get(text)
        if digest is None:
            # Encoded first: text that cannot be encoded raises here every time and is never cached.
            digest = hashlib.sha256(text.encode()).hexdigest()
            n = len(text)
            if n <= self.MAX_CHARS:
                if len(self.digests) >= self.MAX_ENTRIES or self.chars + n > self.MAX_CHARS:
                    self.digests.clear()
                    self.chars = 0
                self.digests[text] = digest
                self.chars += n
        return digest


def _system_hash(body: dict[str, Any], cache: _HashCache) -> str | None:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return None
    parts: list[str] = []
    for m in msgs:
        if isinstance(m, dict) and m.get("role") in ("system", "developer"):
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not parts:
        return None
    return cache.sha256("\n".join(parts))


def _tool_results_from(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool messages of a request: read like ``Exchange.tool_results`` (``tool_call_id``, ``name``, ``content``)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return []
    return [m for m in msgs if isinstance(m, dict) and m.get("role") == "tool"]


def _chunk(r: Any) -> dict[str, Any]:
    return {
        "doc_id": r.doc_id,
        "chunk_id": r.chunk_id,
        "score": r.score,
        "scores": r.scores,
        "title": r.title,
        "uri": r.uri,
        "updated_at": r.updated_at,
        "injected": r.injected,
        "citation": r.citation,
        "excluded_reason": r.excluded_reason,
    }
