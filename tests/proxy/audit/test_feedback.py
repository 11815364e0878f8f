"""Feedback: validation, the reviewer recorded, no feedback across tenants."""

from __future__ import annotations

from typing import Any

import pytest

from llm_warden.proxy.audit.feedback import submit_feedback, validate_feedback
from llm_warden.proxy.errors import BadRequest, NotFound
from llm_warden.proxy.exchange import Principal
from tests.proxy.audit.conftest import LogFactory
from tests.proxy.audit.helpers import make_exchange

REVIEWER = Principal("acme", "reviewer-1", groups=frozenset({"qa"}))


async def test_feedback_is_recorded_with_the_reviewer(make_log: LogFactory) -> None:
    log = await make_log(store_content="redacted")
    await log.record_exchange(make_exchange(request_id="req_fb", tenant="acme", subject="alice"))
    out = await submit_feedback(
        log,
        REVIEWER,
        {
            "request_id": "req_fb",
            "rating": 1,
            "comment": "mail me at rev@example.com",
            "accepted_answer": False,
            "correction": "It shipped today.",
        },
    )
    assert out["object"] == "feedback" and out["recorded"] is True and out["id"].startswith("fb_")
    rows = await log.search(kind="feedback")
    assert len(rows) == 1
    rec = rows[0]
    assert rec["actor"]["subject"] == "reviewer-1" and rec["actor"]["tenant"] == "acme"
    assert rec["data"]["request_id"] == "req_fb" and rec["data"]["rating"] == 1
    assert rec["data"]["comment"] == "mail me at [REDACTED:email]"
    assert rec["data"]["correction"] == "It shipped today."
    assert rec["data"]["requester"] == "alice"


async def test_feedback_for_another_tenant_or_unknown_request_is_the_same_404(make_log: LogFactory) -> None:
    log = await make_log()
    await log.record_exchange(make_exchange(request_id="req_globex", tenant="globex"))
    with pytest.raises(NotFound) as other:
        await submit_feedback(log, REVIEWER, {"request_id": "req_globex", "rating": 1})
    with pytest.raises(NotFound) as unknown:
        await submit_feedback(log, REVIEWER, {"request_id": "req_nope", "rating": 1})
    assert other.value.status == unknown.value.status == 404
    assert other.value.rule == unknown.value.rule == "feedback.request"
    assert other.value.to_dict()["error"]["message"].replace("req_globex", "X") == unknown.value.to_dict()["error"]["message"].replace(
        "req_nope", "X"
    )
    assert await log.search(kind="feedback") == []


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ([], None),
        ({"rating": 1}, "request_id"),
        ({"request_id": 5, "rating": 1}, "request_id"),
        ({"request_id": "r"}, None),
        ({"request_id": "r", "rating": 9}, "rating"),
        ({"request_id": "r", "rating": True}, "rating"),
        ({"request_id": "r", "rating": 1.5}, "rating"),
        ({"request_id": "r", "comment": 3}, "comment"),
        ({"request_id": "r", "comment": "x" * 5000}, "comment"),
        ({"request_id": "r", "accepted_answer": "yes"}, "accepted_answer"),
        ({"request_id": "r", "correction": ["a"]}, "correction"),
        ({"request_id": "r", "rating": 1, "extra": 1}, "extra"),
    ],
)
def test_invalid_feedback_is_a_clear_400(payload: Any, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        validate_feedback(payload)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.rule in ("feedback.schema", "feedback.size")


def test_valid_feedback_is_normalized() -> None:
    assert validate_feedback({"request_id": "r", "accepted_answer": True, "comment": None}) == {"request_id": "r", "accepted_answer": True}
