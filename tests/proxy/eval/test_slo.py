"""``warden eval slo`` on a real audit log: the independent permission re-check, citation coverage, invalid citations."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from llm_warden.proxy.audit.reader import AuditReader
from llm_warden.proxy.eval.cases import CasePrincipal
from llm_warden.proxy.eval.runner import InProcessTarget
from llm_warden.proxy.eval.slo import Targets, acl_allows, standing
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
