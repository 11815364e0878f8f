"""``warden eval export --from-audit``: reviewers' verdicts in the audit log become cases.

Which feedback becomes a case (``POST /v1/feedback`` records, kind ``feedback``):

- ``accepted_answer: true`` — the answer was right.  The case replays the
  exchange's messages as its principal and expects what Warden did then: an
  answer (no refusal), the same documents cited, the same tool calls relayed
  (by name) and the same tool calls refused (by name and rule).  The accepted
  answer is kept as ``source.reference_answer``.
- ``correction`` — the reviewer overrode the answer.  The same case, but the
  reviewer's text is the reference answer, and the case is tagged
  ``needs-checks``: a correction is prose, so the answer checks that encode it
  are a human's to write (the runner never invents them).
- with ``--min-rating N``, feedback rated at least ``N`` counts as accepted too.

The reviewer's identity (``source.reviewer``: tenant, subject, groups), the
time of the verdict, the feedback id and the exchange's request id are kept in
every case's ``source``.  When a request has several verdicts the latest wins.

The messages come from the first upstream request of the record (what Warden
sent), less the context message retrieval inserted (the last of the leading
system messages, when the record says chunks were injected).  A record whose
content is stored as hashes only (``[audit] store_content = "hashes"``)
cannot give its messages: it is skipped and counted, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llm_warden.proxy.eval.cases import Case, CasePrincipal, Expect, ToolExpectation, parse_case

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:\-]")


@dataclass(slots=True)
class ExportResult:
    cases: list[Case] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """Feedback records not turned into a case, by reason."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _client_messages(rec: dict[str, Any]) -> list[dict[str, Any]] | None:
    turns = rec.get("turns") or []
    req = turns[0].get("request") if turns and isinstance(turns[0], dict) else None
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        return None
    msgs = [m for m in req["messages"] if isinstance(m, dict)]
    if ((rec.get("retrieval") or {}).get("injected") or 0) > 0:
        pos = 0
        while pos < len(msgs) and msgs[pos].get("role") in ("system", "developer"):
            pos += 1
        if pos:
            del msgs[pos - 1]
    return msgs


def _tools(rec: dict[str, Any]) -> list[dict[str, Any]] | None:
    turns = rec.get("turns") or []
    req = turns[0].get("request") if turns and isinstance(turns[0], dict) else None
    tools = req.get("tools") if isinstance(req, dict) else None
    return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else None


def case_from(rec: dict[str, Any], feedback: dict[str, Any], kind: str) -> Case | str:
    """The case for one exchange record and the feedback record on it, or why there is none."""
    p = rec.get("principal") or {}
    if not isinstance(p.get("tenant"), str) or not isinstance(p.get("subject"), str):
        return "no principal on the exchange"
    msgs = _client_messages(rec)
    if not msgs:
        return "messages not stored (store_content = hashes, or a refused body)"
    data = feedback.get("data") or {}
    actor = feedback.get("actor") or {}
    calls = rec.get("tool_calls") or []
    relayed = sorted({c["name"] for c in calls if c.get("decision") == "allow" and isinstance(c.get("name"), str)})
    refused = sorted({(c["name"], c.get("rule")) for c in calls if c.get("decision") in ("deny", "repair", "hold") and isinstance(c.get("name"), str)})
    cited = sorted({c["doc_id"] for c in rec.get("citations") or [] if c.get("valid") and isinstance(c.get("doc_id"), str)})
    reference = data.get("correction") if kind == "correction" else (rec.get("response") or {}).get("text")
    rid = str(rec.get("request_id"))
    source = {
        "kind": kind,
        "request_id": rid,
        "feedback_id": data.get("id"),
        "reviewer": {"tenant": actor.get("tenant"), "subject": actor.get("subject"), "groups": actor.get("groups") or []},
        "reviewed_at": feedback.get("ts"),
        "exchange_at": rec.get("ts"),
        "rating": data.get("rating"),
        "comment": data.get("comment"),
        "reference_answer": reference if isinstance(reference, str) else None,
        "model": (rec.get("model") or {}).get("reported") or (rec.get("model") or {}).get("requested"),
    }
    case = Case(
        id=_UNSAFE_ID.sub("_", f"audit-{p['tenant']}-{rid}")[:128],
        principal=CasePrincipal(p["tenant"], p["subject"], tuple(p.get("groups") or ()), tuple(p.get("scopes") or ())),
        messages=msgs,
        expect=Expect(
            cited=tuple(cited),
            tool_calls=tuple(ToolExpectation(n) for n in relayed),
            tools_refused=tuple(ToolExpectation(n, rule=r) for n, r in refused),
        ),
        description=f"from audit: {kind} by {actor.get('subject')} at {feedback.get('ts')}",
        tags=("from-audit", kind) + (("needs-checks",) if kind == "correction" else ()),
        tools=_tools(rec),
        model=(rec.get("model") or {}).get("requested"),
        stream=bool(rec.get("stream")),
        source=source,
    )
    # The exported case must load back as it is written.
    return parse_case(case.as_dict(), case.id)


def verdict_kind(data: dict[str, Any], min_rating: int | None) -> str | None:
    """``correction``, ``accepted``, or ``None`` when the feedback is neither."""
    if isinstance(data.get("correction"), str) and data["correction"].strip():
        return "correction"
    if data.get("accepted_answer") is True:
        return "accepted"
    r = data.get("rating")
    if min_rating is not None and isinstance(r, int) and not isinstance(r, bool) and r >= min_rating:
        return "accepted"
    return None


async def export_cases(reader: Any, *, tenant: str | None = None, since: int | None = None, until: int | None = None, min_rating: int | None = None) -> ExportResult:
    """Cases from every qualifying feedback record (``since``/``until`` in epoch microseconds)."""
    out = ExportResult()
    rows = await reader.search(tenant=tenant, since=since, until=until, limit=100_000, kind="feedback")
    latest: dict[str, dict[str, Any]] = {}
    for fb in sorted(rows, key=lambda r: int(r.get("_seq") or 0)):
        data = fb.get("data") or {}
        rid = data.get("request_id")
        if not isinstance(rid, str):
            out.skip("feedback without a request id")
            continue
        if rid in latest:
            out.skip("superseded by a later verdict")
        latest[rid] = fb
    for rid, fb in latest.items():
        kind = verdict_kind(fb.get("data") or {}, min_rating)
        if kind is None:
            out.skip("not accepted and no correction")
            continue
        tenant_of = (fb.get("actor") or {}).get("tenant")
        rec = await reader.find(rid, tenant_of)
        if rec is None:
            out.skip("exchange record not found")
            continue
        case = case_from(rec, fb, kind)
        if isinstance(case, str):
            out.skip(case)
        else:
            out.cases.append(case)
    return out
