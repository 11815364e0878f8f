"""``warden eval slo`` on a real audit log: the independent permission re-check, citation coverage, invalid citations."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_warden.proxy.audit.reader import AuditReader
from llm_warden.proxy.eval.cases import CasePrincipal
from llm_warden.proxy.eval.runner import InProcessTarget
from llm_warden.proxy.eval.slo import Targets, acl_allows, metrics_standing, standing
from tests.fakeprovider import FakeProvider, Reply

ALICE = CasePrincipal("acme", "alice", ("staff",))


async def _ask(t: InProcessTarget, q: str) -> str:
    async with aiohttp.ClientSession() as s, s.post(f"{t.base_url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": q}]},
                                                     headers={"Authorization": f"Bearer {t.token_for(ALICE)}"}) as r:
        assert r.status == 200
        return r.headers["x-request-id"]


async def _standing(t: InProcessTarget, **kw: Any) -> dict[str, Any]:
    reader = await AuditReader.open(Path(t.cfg.audit.path))
    try:
        return await standing(reader, None, None, Targets(**kw))
    finally:
        await reader.close()


def test_the_acl_rule_written_again() -> None:
    assert acl_allows({"public": True}, "a", set())
    assert acl_allows({"allow_groups": ["hr"]}, "a", {"hr"}) and not acl_allows({"allow_groups": ["hr"]}, "a", {"staff"})
    assert not acl_allows({"public": True, "deny_users": ["a"]}, "a", set())
    assert not acl_allows({"allow_users": ["a"], "deny_groups": ["x"]}, "a", {"x"})


async def test_standing_from_a_real_audit_log(target: InProcessTarget, fake: FakeProvider) -> None:
    fake.push(Reply(content="Within 30 days [1]."), Reply(content="No idea [9]."))
    await _ask(target, "What is the refund window?")
    await _ask(target, "refund window again?")
    res = await _standing(target, min_citation_coverage=0.9)
    pc = res["permission_correctness"]
    assert pc["checked"] == 2 and pc["correct"] == 2 and pc["unverifiable"] == 0 and pc["ratio"] == 1.0
    assert res["citation_coverage"] == {"exchanges_with_context": 2, "covered": 1, "ratio": 0.5, "target": 0.9}
    assert res["invalid_citation_rate"]["invalid"] == 1 and res["invalid_citation_rate"]["citations"] == 2
    assert res["met"] == {"permission_correctness": True, "citation_coverage": False, "invalid_citation_rate": False, "content_age": True}


async def test_a_served_document_the_recorded_acl_denies_is_a_violation(target: InProcessTarget, fake: FakeProvider) -> None:
    """The re-check trusts the audit log's record of each write, not retrieval: when they disagree, it says so."""
    audit = target.running.warden.audit
    await audit.record_event("retrieval.ingest", {"subject": "test"}, {"tenant": "acme", "doc_id": "refunds", "status": "updated", "chunks": 1, "acl": {"allow_groups": ["hr"]}})
    fake.push(Reply(content="30 days [1]."))
    rid = await _ask(target, "What is the refund window?")
    pc = (await _standing(target))["permission_correctness"]
    assert pc["violation_count"] == 1 and pc["violations"][0] == {"request_id": rid, "doc_id": "refunds", "why": "the ACL does not allow alice"}
    await audit.record_event("retrieval.delete", {"subject": "test"}, {"tenant": "acme", "doc_id": "refunds"})
    fake.push(Reply(content="30 days [1]."))
    await _ask(target, "What is the refund window?")
    res = await _standing(target)
    assert {v["why"] for v in res["permission_correctness"]["violations"]} == {"the ACL does not allow alice", "served after its deletion"}
    assert not res["all_met"]

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "eval", "slo", "--db", target.cfg.audit.path, "--since", "1h", "--json",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err
    assert orjson.loads(out)["permission_correctness"]["violation_count"] == 2


# -- the live standing from a running Warden's /metrics ------------------------------------------

EXPOSITION = """# TYPE warden_retrieval_slo_target gauge
warden_retrieval_slo_target{objective="ingest_to_servable_p95_seconds"} 30.0
warden_retrieval_slo_target{objective="source_to_servable_p95_seconds"} 86400.0
warden_retrieval_slo_target{objective="permission_correctness"} 1.0
warden_retrieval_slo_target{objective="citation_coverage"} 0.5
warden_retrieval_slo_target{objective="invalid_citation_rate"} 0.02
# TYPE warden_retrieval_freshness_seconds histogram
warden_retrieval_freshness_seconds_bucket{stage="ingest_to_servable",le="10.0"} 0.0
warden_retrieval_freshness_seconds_bucket{stage="ingest_to_servable",le="60.0"} 10.0
warden_retrieval_freshness_seconds_bucket{stage="ingest_to_servable",le="+Inf"} 10.0
warden_retrieval_freshness_seconds_count{stage="ingest_to_servable"} 10.0
warden_retrieval_freshness_seconds_sum{stage="ingest_to_servable"} 400.0
warden_retrieval_freshness_seconds_bucket{stage="source_to_servable",le="10.0"} 0.0
warden_retrieval_freshness_seconds_bucket{stage="source_to_servable",le="+Inf"} 0.0
# TYPE warden_retrieval_permission_checks counter
warden_retrieval_permission_checks_total{result="ok"} 99.0
warden_retrieval_permission_checks_total{result="violation"} 1.0
# TYPE warden_retrieval_answers counter
warden_retrieval_answers_total{cited="yes"} 3.0
warden_retrieval_answers_total{cited="no"} 1.0
# TYPE warden_citations counter
warden_citations_total{valid="true"} 9.0
warden_citations_total{valid="false"} 1.0
"""


def test_the_live_standing_from_an_exposition() -> None:
    res = metrics_standing(EXPOSITION)
    assert res["freshness_ingest_to_servable"] == {"observed": 10, "p95_s": 57.5, "target_p95_s": 30.0}, "interpolated like histogram_quantile"
    assert res["freshness_source_to_servable"]["p95_s"] is None
    assert res["permission_correctness"] == {"checked": 100, "violations": 1, "ratio": 0.99, "target": 1.0}
    assert res["citation_coverage"]["ratio"] == 0.75 and res["invalid_citation_rate"]["ratio"] == 0.1
    assert res["met"] == {"freshness_ingest_to_servable": False, "freshness_source_to_servable": True, "permission_correctness": False,
                          "citation_coverage": True, "invalid_citation_rate": False}
    with pytest.raises(ValueError, match="retrieval plugin"):
        metrics_standing("# TYPE warden_requests counter\nwarden_requests_total 1.0\n")


async def _cli(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "eval", "slo", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_eval_slo_prints_the_live_standing_next_to_the_audit_log(target: InProcessTarget, fake: FakeProvider) -> None:
    fake.push(Reply(content="Within 30 days [1]."), Reply(content="Within 30 days [1]."), Reply(content="No idea [9]."))
    for q in ("What is the refund window?", "refund window again?", "and once more, the refund window?"):
        await _ask(target, q)
    url = f"{target.running.admin_url}/metrics"
    code, out, err = await _cli("--metrics-url", url, "--db", target.cfg.audit.path, "--since", "1h", "--json")
    assert code == 1, err  # one invalid citation in three: over the 2 % target
    doc = orjson.loads(out)
    live, logged = doc["metrics"], doc["audit_log"]
    assert live["permission_correctness"] == {"checked": 3, "violations": 0, "ratio": 1.0, "target": 1.0}
    assert live["citation_coverage"]["cited"] == 2 and live["citation_coverage"]["answers_with_context"] == 3
    assert live["invalid_citation_rate"]["invalid"] == 1 and live["met"]["invalid_citation_rate"] is False
    assert live["met"]["permission_correctness"] and live["met"]["freshness_ingest_to_servable"]
    assert logged["citation_coverage"]["covered"] == 2, "the audit log agrees"
    code, out, _ = await _cli("--metrics-url", url)
    assert code == 1
    text = out.decode()
    assert "Live, from" in text and "permission correctness  3/3 injected chunks re-checked ok (0 removed)" in text
    assert "invalid citations       1/3" in text and "MISSED" in text and "From the audit log" not in text
    code, _, err = await _cli("--metrics-url", "file:///etc/passwd")
    assert code == 2 and b"http:// or https://" in err
    code, _, err = await _cli("--metrics-url", f"{target.running.admin_url}/nope")
    assert code == 2 and b"cannot read the standing" in err
