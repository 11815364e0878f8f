"""``POST /v1/feedback``: a reviewer's verdict on a recorded exchange.

Body: ``{"request_id": str, "rating": int, "comment": str,
"accepted_answer": bool, "correction": str}`` — ``request_id`` and at least
one of the others are required.  ``rating`` is an integer from -1 to 5
(-1/0/1 for thumbs down/none/up, or 1–5 stars).  The reviewer is the
authenticated principal.  Feedback for an unknown request, or a request of
another tenant, is refused with the same 404 so that existence never leaks
across tenants.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from llm_warden.proxy.errors import BadRequest, NotFound
from llm_warden.proxy.exchange import Principal

MAX_COMMENT = 4000
MAX_CORRECTION = 32000
MAX_REQUEST_ID = 200
_FIELDS = {"request_id", "rating", "comment", "accepted_answer", "correction"}


class FeedbackStore(Protocol):
    """What feedback needs from the audit store."""

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None: ...

    async def record_event(self, kind: str, actor: dict[str, Any], data: dict[str, Any]) -> None: ...


def validate_feedback(payload: Any) -> dict[str, Any]:
    """Check a feedback body; raises :class:`BadRequest` naming the field."""
    if not isinstance(payload, dict):
        raise BadRequest("feedback must be a JSON object", rule="feedback.schema")
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(_FIELDS))})", rule="feedback.schema", param=unknown[0])
    rid = payload.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID:
        raise BadRequest(
            f"request_id must be a non-empty string of at most {MAX_REQUEST_ID} characters", rule="feedback.schema", param="request_id"
        )
    out: dict[str, Any] = {"request_id": rid}
    if "rating" in payload and payload["rating"] is not None:
        r = payload["rating"]
        if isinstance(r, bool) or not isinstance(r, int) or not -1 <= r <= 5:
            raise BadRequest("rating must be an integer from -1 to 5", rule="feedback.schema", param="rating")
        out["rating"] = r
    for name, limit in (("comment", MAX_COMMENT), ("correction", MAX_CORRECTION)):
        if name in payload and payload[name] is not None:
            v = payload[name]
            if not isinstance(v, str):
                raise BadRequest(f"{name} must be a string", rule="feedback.schema", param=name)
            if len(v) > limit:
                raise BadRequest(f"{name} is longer than {limit} characters", rule="feedback.size", param=name)
            out[name] = v
    if "accepted_answer" in payload and payload["accepted_answer"] is not None:
        a = payload["accepted_answer"]
        if not isinstance(a, bool):
            raise BadRequest("accepted_answer must be true or false", rule="feedback.schema", param="accepted_answer")
        out["accepted_answer"] = a
    if len(out) == 1:
        raise BadRequest("give at least one of rating, comment, accepted_answer, correction", rule="feedback.schema")
    return out


async def submit_feedback(audit: FeedbackStore, principal: Principal, payload: Any, *, tenant: str | None = None) -> dict[str, Any]:
    """Validate and record feedback on an exchange of the principal's tenant.

    ``tenant`` names the exchange's tenant when the reviewer is an admin of
    every tenant (the console); by default it is the principal's own.
    Returns the response body: ``{"id", "object": "feedback", "request_id",
    "recorded": true}``.  Raises :class:`BadRequest` or :class:`NotFound`.
    """
    data = validate_feedback(payload)
    tenant = principal.tenant if tenant is None else tenant
    rec = await audit.find(data["request_id"], tenant)
    owner = (rec or {}).get("principal") or {}
    if rec is None or owner.get("tenant") != tenant:
        raise NotFound(f"no request {data['request_id']!r} for this tenant", rule="feedback.request", param="request_id")
    fid = f"fb_{secrets.token_hex(12)}"
    record = {
        "id": fid,
        "request_id": data["request_id"],
        "rating": data.get("rating"),
        "accepted_answer": data.get("accepted_answer"),
        "comment": data.get("comment"),
        "correction": data.get("correction"),
        "requester": owner.get("subject"),
    }
    await audit.record_event("feedback", principal.summary(), record)
    return {"id": fid, "object": "feedback", "request_id": data["request_id"], "recorded": True}
