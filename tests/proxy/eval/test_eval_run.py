"""``warden eval run`` through a real in-process Warden: every check type, scored from the answer and the audit record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llm_warden.proxy.eval.cases import load_cases
from llm_warden.proxy.eval.runner import InProcessTarget, RunOptions, run_cases
from tests.fakeprovider import FakeProvider, Reply
from tests.proxy.eval.conftest import DEV_SECRET_ENV, dev_config

STAFF = {"tenant": "acme", "user": "alice", "groups": ["staff"]}
ASK = [{"role": "user", "content": "What is the refund window?"}]
OFFER = [
    {"type": "function", "function": {"name": "lookup_invoice", "parameters": {"type": "object", "properties": {"invoice_id": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "refund", "parameters": {"type": "object", "properties": {"invoice_id": {"type": "string"}}}}},
]


def _write(tmp: Path, cases: list[dict[str, Any]]) -> Path:
    p = tmp / "cases.yaml"
    p.write_text(yaml.safe_dump(cases))
    return p


def _checks(result: Any) -> dict[str, bool]:
    return {c.name: c.passed for c in result.checks}


async def test_every_check_type_scores_from_the_answer_and_the_record(target: InProcessTarget, fake: FakeProvider, tmp_path: Path) -> None:
    cases = load_cases(_write(tmp_path, [
        {"id": "grounded", "principal": STAFF, "messages": ASK,
         "expect": {"cited": ["refunds"], "not_cited": ["salaries"], "not_injected": ["salaries", "globex-refunds"],
                    "answer": {"contains": ["30 DAYS"], "not_contains": ["salary"], "regex": [r"\b30 days\b"]},
                    "max_latency_ms": 60000, "max_total_tokens": 100000}},
        {"id": "read-tool-relayed", "principal": STAFF, "messages": [{"role": "user", "content": "invoice 42?"}], "tools": OFFER,
         "expect": {"tool_calls": [{"name": "lookup_invoice", "arguments": {"invoice_id": "42"}}]}},
        {"id": "write-refused-in-read-only", "principal": STAFF, "messages": [{"role": "user", "content": "refund 42"}], "tools": OFFER,
         "expect": {"tools_refused": [{"name": "refund", "rule": "policy.read_only"}], "no_tool_calls": True}},
        {"id": "json-answer", "principal": STAFF, "messages": [{"role": "user", "content": "as json"}],
         "expect": {"answer": {"json_schema": {"type": "object", "required": ["days"], "properties": {"days": {"type": "integer"}}}, "exact": '{"days": 30}'}}},
        {"id": "streamed", "principal": STAFF, "messages": ASK, "stream": True,
         "expect": {"cited": ["refunds"], "answer": {"contains": ["30 days"]}}},
        {"id": "wrong-expectation", "principal": STAFF, "messages": ASK,
         "expect": {"answer": {"contains": ["90 days"], "exact": "nope"}, "cited": ["globex-refunds"], "max_total_tokens": 1}},
    ]))
    fake.push(
        Reply(content="Refunds are accepted within 30 days [1]."),
        Reply(content=None, tool_calls=[{"name": "lookup_invoice", "arguments": '{"invoice_id": "42"}'}]),
        Reply(content=None, tool_calls=[{"name": "refund", "arguments": '{"invoice_id": "42"}'}]),
        Reply(content="I cannot issue refunds right now."),
        Reply(content='{"days": 30}'),
        Reply(content="Within 30 days [1]."),
        Reply(content="Refunds are accepted within 30 days [1]."),
    )
    results = {r.case.id: r for r in await run_cases(target, cases, RunOptions(concurrency=1))}
    for cid in ("grounded", "read-tool-relayed", "write-refused-in-read-only", "json-answer", "streamed"):
        assert results[cid].passed, (cid, [c.as_dict() for c in results[cid].checks if not c.passed])
    g = results["grounded"]
    assert set(_checks(g)) == {"answered", "cited[refunds]", "not_cited[salaries]", "not_injected[salaries]", "not_injected[globex-refunds]",
                               "answer.contains[0]", "answer.not_contains[0]", "answer.regex[0]", "max_latency_ms", "max_total_tokens"}
    assert g.outcome.audit and g.outcome.injected == ["refunds"] and g.outcome.request_id
    w = results["write-refused-in-read-only"]
    assert [(d["name"], d["decision"], d["rule"]) for d in w.outcome.tool_decisions] == [("refund", "deny", "policy.read_only")]
    bad = results["wrong-expectation"]
    assert not bad.passed
    assert _checks(bad) == {"answered": True, "cited[globex-refunds]": False, "answer.contains[0]": False, "answer.exact": False, "max_total_tokens": False}
    assert "cited: ['refunds']" in next(c.detail for c in bad.checks if c.name == "cited[globex-refunds]")


async def test_a_refusal_is_expected_by_status_and_rule(target: InProcessTarget, fake: FakeProvider, tmp_path: Path) -> None:
    cases = load_cases(_write(tmp_path, [
        {"id": "refused", "principal": STAFF, "messages": [{"role": "user", "content": "refund 42"}], "tools": OFFER,
         "expect": {"refusal": {"status": 403, "rule": "policy.read_only"}}},
        {"id": "refused-other-rule", "principal": STAFF, "messages": [{"role": "user", "content": "refund 42"}], "tools": OFFER,
         "expect": {"refusal": {"rule": "policy.schema"}}},
        {"id": "expected-refusal-but-answered", "principal": STAFF, "messages": ASK, "expect": {"refusal": True}},
        {"id": "refused-mid-stream", "principal": STAFF, "messages": [{"role": "user", "content": "refund 42"}], "tools": OFFER, "stream": True,
         "expect": {"refusal": {"status": 403, "rule": "policy.read_only"}}},
    ]))
    call = Reply(content=None, tool_calls=[{"name": "refund", "arguments": '{"invoice_id": "42"}'}])
    fake.push(call, call, call, call, call, call, Reply(content="fine"), call, call, call)
    results = {r.case.id: r for r in await run_cases(target, cases, RunOptions(concurrency=1))}
    assert results["refused"].passed, [c.as_dict() for c in results["refused"].checks]
    assert results["refused"].outcome.status == 403 and results["refused"].outcome.error
    assert not results["refused-other-rule"].passed
    assert not results["expected-refusal-but-answered"].passed
    assert results["refused-mid-stream"].passed, [c.as_dict() for c in results["refused-mid-stream"].checks]


async def test_the_principal_of_each_case_is_the_one_warden_sees(target: InProcessTarget, fake: FakeProvider, tmp_path: Path) -> None:
    """The same question as another tenant's user: only that tenant's documents are injected (the token carries the case's principal)."""
    cases = load_cases(_write(tmp_path, [
        {"id": "globex", "principal": {"tenant": "globex", "user": "gina"}, "messages": ASK,
         "expect": {"not_injected": ["refunds", "salaries"], "cited": ["globex-refunds"]}},
        {"id": "hr", "principal": {"tenant": "acme", "user": "harry", "groups": ["hr"]}, "messages": [{"role": "user", "content": "salary bands refunds"}],
         "expect": {"cited": ["salaries"]}},
    ]))
    fake.push(Reply(content="90 days [1]."), Reply(content="See [1] and [2]."))
    results = {r.case.id: r for r in await run_cases(target, cases, RunOptions(concurrency=1))}
    assert results["globex"].passed, [c.as_dict() for c in results["globex"].checks]
    assert results["globex"].outcome.injected == ["globex-refunds"]
    assert "salaries" in results["hr"].outcome.injected


async def test_model_override_and_concurrency(target: InProcessTarget, fake: FakeProvider, tmp_path: Path) -> None:
    cases = load_cases(_write(tmp_path, [{"id": f"c{i}", "principal": STAFF, "messages": ASK, "model": "case-model", "expect": {}} for i in range(6)]))
    results = await run_cases(target, cases, RunOptions(model="override-model", concurrency=3))
    assert [r.case.id for r in results] == [f"c{i}" for i in range(6)] and all(r.passed for r in results)
    assert {req.body["model"] for req in fake.chat_requests()} == {"override-model"}


async def test_a_running_warden_by_url_with_the_dev_secret_and_its_audit_store(fake: FakeProvider, tmp_path: Path, monkeypatch: Any) -> None:
    """``--url``: tokens signed with the config's HS256 dev secret, decisions read from the config's audit store."""
    from llm_warden.proxy.app import Warden
    from llm_warden.proxy.audit.factory import build_audit
    from llm_warden.proxy.config import load_config
    from llm_warden.proxy.eval.runner import RemoteTarget
    from llm_warden.proxy.plugin import available_plugins
    from llm_warden.proxy.testing import RunningWarden

    monkeypatch.setenv(DEV_SECRET_ENV, "d" * 40)
    cfg_path = dev_config(fake, tmp_path, """
[audit]
path = "audit.db"
fsync = false
[plugins]
enabled = ["headers", "tools"]
[policy]
state_db = "state.db"
[[tools]]
name = "refund"
effect = "write"
schema = { type = "object" }
""")
    classes = available_plugins()
    cfg = load_config(cfg_path, classes)
    rw = await RunningWarden.start(Warden(cfg, classes, audit=build_audit(cfg)))
    try:
        target = await RemoteTarget.open(rw.base_url.removesuffix("/v1"), str(cfg_path), None, None)
        cases = load_cases(_write(tmp_path, [
            {"id": "ok", "principal": {"tenant": "t1", "user": "u1", "groups": ["g"], "scopes": ["s1"]}, "messages": ASK, "expect": {"answer": {"contains": ["fine"]}}},
            {"id": "fenced", "principal": {"tenant": "t1", "user": "u1"}, "messages": ASK, "tools": OFFER[1:], "expect": {"tools_refused": [{"name": "refund", "rule": "policy.read_only"}]}},
        ]))
        fake.push(Reply(content="fine"), Reply(content=None, tool_calls=[{"name": "refund", "arguments": "{}"}]), Reply(content="cannot"))
        try:
            results = {r.case.id: r for r in await run_cases(target, cases, RunOptions(concurrency=1))}
        finally:
            await target.close()
    finally:
        await rw.stop()
    assert all(r.passed for r in results.values()), [c.as_dict() for r in results.values() for c in r.checks if not c.passed]
    assert results["ok"].outcome.audit and results["fenced"].outcome.tool_decisions[0]["rule"] == "policy.read_only"
