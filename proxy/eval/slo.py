"""``warden eval slo``: where retrieval stands against its objectives, from the audit log.

- **permission correctness** — every injected document of every exchange in
  the window is re-checked, independently of retrieval's own code, against
  the document's ACL as the audit log recorded it when it was written through
  the admin API (``retrieval.ingest``, ``retrieval.ingest_bulk``,
  ``retrieval.delete`` records, the latest before the exchange): deny wins,
  then public or a grant to the user or one of their groups; a document served
  after its deletion is a violation.  Documents with no such record (written
  with ``warden ingest``, or before the window of the log) are counted as
  unverifiable, never as correct.  The objective is 100 %.
- **citation coverage** — of the answered exchanges that had context
  injected, the share whose answer cites at least one injected document.
- **invalid-citation rate** — citations of numbers never given, over all
  citations.
- **served-content age** — the age of each injected document's source
  (``updated_at``) when it was served, p50 / p95.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_KINDS = ("retrieval.ingest", "retrieval.ingest_bulk", "retrieval.delete")


@dataclass(frozen=True, slots=True)
class Targets:
    min_citation_coverage: float = 0.9
    max_invalid_citation_rate: float = 0.02
    max_content_age_p95_days: float | None = None


def acl_allows(acl: dict[str, Any], subject: str, groups: set[str]) -> bool:
    """The ACL's decision, written here again on purpose (an independent re-check): deny wins, then any grant."""
    if subject in (acl.get("deny_users") or []) or groups & set(acl.get("deny_groups") or []):
        return False
    return bool(acl.get("public")) or subject in (acl.get("allow_users") or []) or bool(groups & set(acl.get("allow_groups") or []))


def iso_timestamp(value: Any) -> float | None:
    """Epoch seconds of an ISO 8601 date or date-time (UTC when it names no zone); ``None`` when it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


async def standing(reader: Any, since: int | None, until: int | None, targets: Targets) -> dict[str, Any]:
    """The SLO standing over the exchanges recorded in ``[since, until)`` (epoch microseconds)."""
    history: dict[tuple[str, str], list[tuple[int, dict[str, Any] | None]]] = {}
    for kind in _KINDS:
        for rec in await reader.search(kind=kind, until=until, limit=100_000):
            data, ts = rec.get("data") or {}, int(rec.get("ts_us") or 0)
            tenant = data.get("tenant")
            if kind == "retrieval.ingest_bulk":
                items = [(d.get("doc_id"), d.get("acl")) for d in data.get("documents") or [] if isinstance(d, dict)]
            else:
                items = [(data.get("doc_id"), data.get("acl") if kind == "retrieval.ingest" else None)]
            for doc_id, acl in items:
                if isinstance(tenant, str) and isinstance(doc_id, str):
                    history.setdefault((tenant, doc_id), []).append((ts, acl if isinstance(acl, dict) else None))
    for events in history.values():
        events.sort(key=lambda e: e[0])
    checked = correct = unverifiable = 0
    violations: list[dict[str, Any]] = []
    with_context = covered = citations = invalid = 0
    ages: list[float] = []
    for rec in await reader.search(kind="exchange", since=since, until=until, limit=100_000):
        p = rec.get("principal") or {}
        tenant, subject, groups = p.get("tenant"), p.get("subject"), set(p.get("groups") or [])
        ts = int(rec.get("ts_us") or 0)
        injected = [r for r in rec.get("retrieved") or [] if isinstance(r, dict) and r.get("injected")]
        cites = [c for c in rec.get("citations") or [] if isinstance(c, dict)]
        citations += len(cites)
        invalid += sum(1 for c in cites if not c.get("valid"))
        if injected and isinstance(rec.get("status"), int) and 200 <= rec["status"] < 300:
            with_context += 1
            covered += any(c.get("valid") for c in cites)
        for doc_id in sorted({str(r.get("doc_id")) for r in injected}):
            checked += 1
            events = history.get((str(tenant), doc_id), [])
            i = bisect.bisect_right([e[0] for e in events], ts) - 1
            if i < 0:
                unverifiable += 1
                continue
            acl = events[i][1]
            if acl is None:
                violations.append({"request_id": rec.get("request_id"), "doc_id": doc_id, "why": "served after its deletion"})
            elif not acl_allows(acl, str(subject), groups):
                violations.append({"request_id": rec.get("request_id"), "doc_id": doc_id, "why": f"the ACL does not allow {subject}"})
            else:
                correct += 1
        for r in injected:
            updated = iso_timestamp(r.get("updated_at"))
            if updated is not None:
                ages.append(max(0.0, ts / 1e6 - updated) / 86400)
    verifiable = checked - unverifiable
    coverage = covered / with_context if with_context else None
    invalid_rate = invalid / citations if citations else None
    age_p95 = _pct(ages, 0.95)
    met = {
        "permission_correctness": not violations,
        "citation_coverage": coverage is None or coverage >= targets.min_citation_coverage,
        "invalid_citation_rate": invalid_rate is None or invalid_rate <= targets.max_invalid_citation_rate,
        "content_age": targets.max_content_age_p95_days is None or age_p95 is None or age_p95 <= targets.max_content_age_p95_days,
    }
    return {
        "permission_correctness": {"checked": checked, "correct": correct, "violations": violations[:100], "violation_count": len(violations),
                                   "unverifiable": unverifiable, "ratio": round(correct / verifiable, 6) if verifiable else None, "target": 1.0},
        "citation_coverage": {"exchanges_with_context": with_context, "covered": covered, "ratio": round(coverage, 4) if coverage is not None else None,
                              "target": targets.min_citation_coverage},
        "invalid_citation_rate": {"citations": citations, "invalid": invalid, "ratio": round(invalid_rate, 4) if invalid_rate is not None else None,
                                  "target": targets.max_invalid_citation_rate},
        "content_age_days": {"served": len(ages), "p50": _pct(ages, 0.5), "p95": age_p95, "target_p95": targets.max_content_age_p95_days},
        "met": met,
        "all_met": all(met.values()),
    }


# -- the live standing, from a running Warden's /metrics -------------------------------------

_FRESHNESS = "warden_retrieval_freshness_seconds"


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of cumulative histogram buckets ``(le, count)`` as Prometheus' ``histogram_quantile`` interpolates it."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le  # beyond the largest finite bucket: its bound is all that is known
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 0.0)
        prev_le, prev_n = le, n
    return prev_le


def metrics_standing(text: str) -> dict[str, Any]:
    """The SLO standing since the scraped Warden started: its counters and histograms and the targets it exports.

    Raises ``ValueError`` when ``text`` is not Prometheus' text format or the
    Warden runs without the retrieval plugin (no ``warden_retrieval_slo_target``).
    """
    from prometheus_client.parser import text_string_to_metric_families

    targets: dict[str, float] = {}
    checks = {"ok": 0.0, "violation": 0.0}
    answers = {"yes": 0.0, "no": 0.0}
    cites = {"true": 0.0, "false": 0.0}
    fresh: dict[str, list[tuple[float, float]]] = {"ingest_to_servable": [], "source_to_servable": []}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lab = s.labels
            if s.name == "warden_retrieval_slo_target":
                targets[lab.get("objective", "")] = s.value
            elif s.name == "warden_retrieval_permission_checks_total" and lab.get("result") in checks:
                checks[lab["result"]] += s.value
            elif s.name == "warden_retrieval_answers_total" and lab.get("cited") in answers:
                answers[lab["cited"]] += s.value
            elif s.name == "warden_citations_total" and lab.get("valid") in cites:
                cites[lab["valid"]] += s.value
            elif s.name == f"{_FRESHNESS}_bucket" and lab.get("stage") in fresh:
                fresh[lab["stage"]].append((float(lab["le"]), s.value))
    if not targets:
        raise ValueError("the metrics have no warden_retrieval_slo_target: is the retrieval plugin enabled on that Warden?")
    out: dict[str, Any] = {}
    met: dict[str, bool] = {}
    for stage, buckets in fresh.items():
        key = f"{stage}_p95_seconds"
        p95 = _quantile(buckets, 0.95)
        target = targets.get(key)
        n = max((c for _, c in buckets), default=0.0)
        out[f"freshness_{stage}"] = {"observed": int(n), "p95_s": None if p95 is None else round(p95, 3), "target_p95_s": target}
        met[f"freshness_{stage}"] = p95 is None or target is None or p95 <= target
    checked = checks["ok"] + checks["violation"]
    ratio = checks["ok"] / checked if checked else None
    out["permission_correctness"] = {"checked": int(checked), "violations": int(checks["violation"]),
                                     "ratio": None if ratio is None else round(ratio, 6), "target": targets.get("permission_correctness", 1.0)}
    met["permission_correctness"] = checks["violation"] == 0
    with_context = answers["yes"] + answers["no"]
    coverage = answers["yes"] / with_context if with_context else None
    target = targets.get("citation_coverage")
    out["citation_coverage"] = {"answers_with_context": int(with_context), "cited": int(answers["yes"]),
                                "ratio": None if coverage is None else round(coverage, 4), "target": target}
    met["citation_coverage"] = coverage is None or target is None or coverage >= target
    total = cites["true"] + cites["false"]
    invalid = cites["false"] / total if total else None
    target = targets.get("invalid_citation_rate")
    out["invalid_citation_rate"] = {"citations": int(total), "invalid": int(cites["false"]),
                                    "ratio": None if invalid is None else round(invalid, 4), "target": target}
    met["invalid_citation_rate"] = invalid is None or target is None or invalid <= target
    out["met"] = met
    out["all_met"] = all(met.values())
    return out
