"""Retrieval's objectives as live metrics: freshness, an independent permission re-check, citations.

- **Freshness**: when a document version becomes servable on this replica
  (its chunks committed to every local engine this replica searches: the
  embedded store's index after its commit, a PostgreSQL fleet replica when
  its follower applied the change), :class:`SloMetrics.servable` observes
  ``warden_retrieval_freshness_seconds{stage}``: ``ingest_to_servable``
  (from ``indexed_at``, the commit to the store of record) and
  ``source_to_servable`` (from ``updated_at``, the source's own update time).
- **Permission re-check** (:func:`recheck`): after injection chose its
  chunks, each chunk's document is read again from the store of record (one
  batched read, the one the admin API uses) and its ACL is evaluated by
  :func:`proxy.eval.slo.acl_allows`, code the search filter does not share.
  A chunk that fails — document gone, replaced, in another tenant, an ACL
  that does not parse or does not allow the principal — is removed before
  the request goes upstream (rule ``retrieval.acl_recheck``).
- **Citations**: ``warden_retrieval_answers_total{cited}`` counts answers
  that had context injected; the core's ``warden_citations_total{valid}``
  counts the citations themselves.
- **Targets** (``[retrieval.slo]``) are exported as
  ``warden_retrieval_slo_target{objective}``: the alert rules compare with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_warden.proxy.eval.slo import acl_allows, iso_timestamp

if TYPE_CHECKING:
    from llm_warden.plugins.retrieval.config import SloConfig
    from llm_warden.plugins.retrieval.inject import Hit
    from llm_warden.plugins.retrieval.records import DocumentRow, RecordStore
    from llm_warden.proxy.exchange import Exchange, Principal
    from llm_warden.proxy.metrics import Metrics

RECHECK_RULE = "retrieval.acl_recheck"
FRESHNESS_STAGES = ("ingest_to_servable", "source_to_servable")
# From sub-second (one replica, ingest through the admin API) to a week (a source synced weekly).
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0)
OBJECTIVES = ("ingest_to_servable_p95_seconds", "source_to_servable_p95_seconds", "permission_correctness", "citation_coverage", "invalid_citation_rate")
_ACL_LISTS = ("allow_users", "allow_groups", "deny_users", "deny_groups")


@dataclass
class Recheck:
    """What the re-check of one request found: chunks checked and those removed (chunk id → why)."""

    checked: int = 0
    removed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "violations": [{"chunk_id": c, "why": w} for c, w in sorted(self.removed.items())]}


def _well_formed(acl: Any) -> bool:
    """An ACL as the store writes it: an object of string lists and a boolean ``public`` (anything else fails closed)."""
    if not isinstance(acl, dict) or not isinstance(acl.get("public", False), bool):
        return False
    return all(isinstance(v, list) and all(isinstance(x, str) for x in v) for k in _ACL_LISTS if (v := acl.get(k)) is not None)


def _version(chunk_id: str, tenant: str, doc_id: str) -> str | None:
    """The content-hash prefix a chunk id names (``tenant/doc#hash.n``), ``None`` when it names another document."""
    head, sep, tail = chunk_id.rpartition("#")
    if not sep or head != f"{tenant}/{doc_id}":
        return None
    return tail.partition(".")[0]


def verdict(hit: Hit, doc: DocumentRow | None, principal: Principal) -> str | None:
    """Why ``hit`` must not be injected for ``principal`` given its document as the store of record holds it (``None``: fine)."""
    if doc is None:
        return "document not in the store of record"
    if doc.tenant != principal.tenant or hit.doc_id != doc.doc_id:
        return "document of another tenant"
    version = _version(hit.chunk_id, doc.tenant, doc.doc_id)
    if version is None or not doc.content_hash.startswith(version):
        return "chunk not of the stored version of the document"
    if not _well_formed(doc.acl):
        return "stored ACL is malformed"
    if not acl_allows(doc.acl, principal.subject, set(principal.groups)):
        return "stored ACL does not allow the principal"
    return None


async def recheck(store: RecordStore, principal: Principal, hits: list[Hit]) -> Recheck:
    """Re-check every chosen chunk against its document in the store of record (one batched read)."""
    out = Recheck(checked=len(hits))
    if not hits:
        return out
    docs = await store.get_documents(principal.tenant, sorted({h.doc_id for h in hits}))
    for h in hits:
        why = verdict(h, docs.get(h.doc_id), principal)
        if why is not None:
            out.removed[h.chunk_id] = why
    return out


def renumber(hits: list[Hit]) -> None:
    """Number the injected chunks 1..n again (after some were removed)."""
    for i, h in enumerate(hits, start=1):
        h.citation = i


class SloMetrics:
    """The retrieval SLO metrics of one server (defined at start on the server's :class:`~proxy.metrics.Metrics`)."""

    def __init__(self, metrics: Metrics, targets: Callable[[], SloConfig]) -> None:
        self.freshness = metrics.histogram(
            "warden_retrieval_freshness_seconds",
            "Seconds from a document's ingest (stage ingest_to_servable) or its source's update time (source_to_servable) to servable on this replica.",
            ("stage",), buckets=FRESHNESS_BUCKETS,
        )
        self._fresh = {s: self.freshness.labels(stage=s) for s in FRESHNESS_STAGES}
        self.checks = metrics.counter(
            "warden_retrieval_permission_checks",
            "Injected chunks re-checked against the store of record's ACL, by result (ok, violation: removed before the upstream call).",
            ("result",),
        )
        self._ok, self._violation = self.checks.labels(result="ok"), self.checks.labels(result="violation")
        self.answers = metrics.counter(
            "warden_retrieval_answers",
            "Answers given with retrieved context injected, by whether they cite an injected entry (cited: yes, no).",
            ("cited",),
        )
        self._cited, self._uncited = self.answers.labels(cited="yes"), self.answers.labels(cited="no")

        def target_values() -> dict[str, float]:
            t = targets()
            return {
                "ingest_to_servable_p95_seconds": t.ingest_to_servable_p95_s,
                "source_to_servable_p95_seconds": t.source_to_servable_p95_s,
                "permission_correctness": t.permission_correctness,
                "citation_coverage": t.citation_coverage,
                "invalid_citation_rate": t.invalid_citation_rate,
            }

        metrics.gauge("warden_retrieval_slo_target", "Retrieval objectives from [retrieval.slo], by objective (the alert rules compare with them).",
                      ("objective",), callback=target_values)

    def servable(self, docs: Iterable[DocumentRow], now: float | None = None) -> None:
        """Observe freshness for document versions that just became servable on this replica."""
        now = time.time() if now is None else now
        ingest, source = self._fresh["ingest_to_servable"], self._fresh["source_to_servable"]
        for d in docs:
            if d.indexed_at:
                ingest.observe(max(0.0, now - d.indexed_at))
            updated = iso_timestamp(d.updated_at)
            # A source clock ahead of ours is no measurement (left out, never a negative lag).
            if updated is not None and updated <= now + 1.0:
                source.observe(max(0.0, now - updated))

    def rechecked(self, r: Recheck) -> None:
        if r.checked > len(r.removed):
            self._ok.inc(r.checked - len(r.removed))
        if r.removed:
            self._violation.inc(len(r.removed))

    def answered(self, ex: Exchange) -> None:
        """Count an answer given with context injected (a whole 2xx answer; a cut stream or an error is no answer)."""
        r = ex.retrieval
        if r is None or not r.injected or ex.error is not None or ex.cut is not None or not ex.response_text:
            return
        if ex.status is not None and not 200 <= ex.status < 300:
            return
        (self._cited if any(c.valid for c in ex.citations) else self._uncited).inc()
