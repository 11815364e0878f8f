"""From a search to one system message: selection, context budget, rendering, placement.

:func:`build_result` turns fused candidates into what is injected: the first
``top_k`` readable candidates, each kept while it fits the token budget (a
chunk that does not fit is excluded with reason ``budget`` and smaller ones
after it may still fit).  :func:`render_context` numbers the chunks and wraps
each in ``<context n="..">`` delimiters whose attribute values and bodies are
escaped so a document cannot close its own entry or forge another one.
:func:`insert_context` puts the one system message right after the
application's own leading system messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_warden.plugins.retrieval.acl import Acl, Reader
from llm_warden.plugins.retrieval.chunking import approx_tokens
from llm_warden.proxy.exchange import RetrievedChunk

if TYPE_CHECKING:
    from llm_warden.plugins.retrieval.store import ChunkRow, DocumentRow

# "<context", "</context", "< / context", and the same with look-alike brackets
# (fullwidth, small, angle): a document must not open or close an entry.
_TAG_RE = re.compile(r"[<\uff1c\ufe64\u2329\u27e8\u3008]\s*(/?)\s*(context)", re.IGNORECASE)
_ENTRY_OVERHEAD_TOKENS = 12


@dataclass
class Hit:
    """One candidate chunk with its scores, ranks and (when excluded) the reason."""

    chunk_id: str
    doc_id: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    rank: int = 0
    title: str = ""
    uri: str = ""
    source: str = ""
    updated_at: str | None = None
    heading_path: list[str] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    start: int = 0
    end: int = 0
    injected: bool = False
    citation: int | None = None
    excluded_reason: str | None = None

    @staticmethod
    def make(chunk_id: str, row: tuple[ChunkRow, DocumentRow] | None, score: float, scores: dict[str, float],
             ranks: dict[str, int], reader: Reader) -> Hit:
        """A hit from an engine result and its store row; rows gone or no longer readable are excluded without text."""
        if row is None:
            return Hit(chunk_id, "", score, scores, ranks, excluded_reason="stale")
        chunk, doc = row
        if doc.tenant != reader.tenant or not Acl.from_json(doc.acl).allows(reader.subject, reader.groups):
            return Hit(chunk_id, doc.doc_id, score, scores, ranks, excluded_reason="acl")
        return Hit(chunk_id, doc.doc_id, score, scores, ranks, title=doc.title, uri=doc.uri, source=doc.source,
                   updated_at=doc.updated_at, heading_path=chunk.heading_path, text=chunk.text, tokens=chunk.tokens,
                   start=chunk.start, end=chunk.end)

    def cost(self) -> int:
        """Tokens this chunk takes in the rendered context (text plus its entry header)."""
        return self.tokens + approx_tokens(f"{self.title} {self.uri or self.source} {self.updated_at or ''}") + _ENTRY_OVERHEAD_TOKENS

    def to_json(self, with_text: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"chunk_id": self.chunk_id, "doc_id": self.doc_id, "rank": self.rank, "score": self.score,
                               "scores": self.scores, "ranks": self.ranks}
        if self.excluded_reason is not None:
            out["excluded_reason"] = self.excluded_reason
        if self.excluded_reason in ("acl", "stale"):
            return out
        out.update({"title": self.title, "uri": self.uri, "source": self.source, "updated_at": self.updated_at,
                    "heading_path": self.heading_path, "tokens": self.tokens, "start": self.start, "end": self.end})
        if self.injected:
            out["citation"] = self.citation
        if with_text:
            out["text"] = self.text
        return out

    def to_retrieved(self) -> RetrievedChunk:
        return RetrievedChunk(doc_id=self.doc_id, chunk_id=self.chunk_id, score=self.score, scores=dict(self.scores),
                              title=self.title, uri=self.uri, updated_at=self.updated_at, injected=self.injected,
                              citation=self.citation, excluded_reason=self.excluded_reason)


@dataclass
class SearchResult:
    """What a search selected (``hits``, in citation order) and what it left out (``excluded``)."""

    query: str
    mode: str
    hits: list[Hit]
    excluded: list[Hit]
    context_tokens: int
    candidates: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query, "mode": self.mode, "context_tokens": self.context_tokens, "candidates": self.candidates,
            "injected": [h.to_json() for h in self.hits],
            "excluded": [h.to_json(with_text=False) for h in self.excluded],
            "timings_ms": {k.removesuffix("_ms"): round(v, 3) for k, v in self.timings.items()},
        }


def build_result(query: str, mode: str, hits: list[Hit], top_k: int, max_tokens: int, debug: bool) -> SearchResult:
    """Select the injected chunks from fused candidates (best first); see the module docstring."""
    selected: list[Hit] = []
    excluded: list[Hit] = []
    used = 0
    considered = 0
    for rank, hit in enumerate(hits, start=1):
        hit.rank = rank
        if hit.excluded_reason is not None:
            excluded.append(hit)
            continue
        if considered >= top_k:
            if debug:
                hit.excluded_reason = "rank"
                excluded.append(hit)
            continue
        considered += 1
        cost = hit.cost()
        if used + cost > max_tokens:
            hit.excluded_reason = "budget"
            excluded.append(hit)
            continue
        used += cost
        hit.injected = True
        hit.citation = len(selected) + 1
        selected.append(hit)
    return SearchResult(query, mode, selected, excluded, used, len(hits))


def _attr(value: str) -> str:
    return (value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " ").replace("\r", " "))


def _body(text: str) -> str:
    return _TAG_RE.sub(lambda m: f"&lt;{m.group(1)}{m.group(2)}", text)


def render_context(hits: list[Hit], template: str) -> str:
    """The system message: the template with ``{context}`` replaced by the numbered, delimited entries."""
    entries = []
    for h in hits:
        attrs = [f'n="{h.citation}"', f'doc="{_attr(h.doc_id)}"']
        if h.title:
            attrs.append(f'title="{_attr(h.title)}"')
        if h.uri or h.source:
            attrs.append(f'source="{_attr(h.uri or h.source)}"')
        if h.heading_path:
            attrs.append(f'section="{_attr(" > ".join(h.heading_path))}"')
        if h.updated_at:
            attrs.append(f'updated="{_attr(h.updated_at)}"')
        entries.append(f"<context {' '.join(attrs)}>\n{_body(h.text)}\n</context>")
    return template.replace("{count}", str(len(hits))).replace("{context}", "\n".join(entries))


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message (string content, or the text parts of a list)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def build_query(messages: Any, turns: int, max_chars: int) -> str:
    """The retrieval query: the last ``turns`` user messages (oldest first), cut to the last ``max_chars``."""
    if not isinstance(messages, list):
        return ""
    texts: list[str] = []
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            t = message_text(m).strip()
            if t:
                texts.append(t)
            if len(texts) >= turns:
                break
    query = "\n".join(reversed(texts))
    return query[-max_chars:] if len(query) > max_chars else query


def insert_context(body: dict[str, Any], content: str) -> dict[str, Any]:
    """A copy of ``body`` with one system message inserted after the leading system/developer messages."""
    messages = list(body.get("messages") or [])
    pos = 0
    while pos < len(messages) and isinstance(messages[pos], dict) and messages[pos].get("role") in ("system", "developer"):
        pos += 1
    messages.insert(pos, {"role": "system", "content": content})
    return {**body, "messages": messages}
