"""``warden eval export --from-audit``: real feedback records in a real audit log become cases that run again."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from llm_warden.proxy.audit.reader import AuditReader
from llm_warden.proxy.eval.cases import CasePrincipal, load_cases
from llm_warden.proxy.eval.export import export_cases
from llm_warden.proxy.eval.runner import InProcessTarget, RunOptions, run_cases
from tests.fakeprovider import FakeProvider, Reply

ALICE = CasePrincipal("acme", "alice", ("staff",))
REVIEWER = CasePrincipal("acme", "rita", ("qa",))


async def _chat(t: InProcessTarget, s: aiohttp.ClientSession, p: CasePrincipal, body: dict[str, Any]) -> str:
    async with s.post(f"{t.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {t.token_for(p)}"}) as r:
        assert r.status == 200, await r.text()
        return r.headers["x-request-id"]


async def _feedback(t: InProcessTarget, s: aiohttp.ClientSession, p: CasePrincipal, body: dict[str, Any]) -> None:
    async with s.post(f"{t.base_url}/feedback", json=body, headers={"Authorization": f"Bearer {t.token_for(p)}"}) as r:
        assert r.status == 200, await r.text()


async def test_accepted_answers_and_corrections_become_cases_with_the_reviewer(target: InProcessTarget, fake: FakeProvider, tmp_path: Path) -> None:
    offer = [{"type": "function", "function": {"name": "lookup_invoice", "parameters": {"type": "object", "properties": {"invoice_id": {"type": "string"}}}}}]
    fake.push(
        Reply(content="Refunds are accepted within 30 days [1]."),
        Reply(content=None, tool_calls=[{"name": "lookup_invoice", "arguments": '{"invoice_id": "7"}'}]),
        Reply(content="Refunds take a year."),
        Reply(content="meh"),
        Reply(content="first try"),
    )
    async with aiohttp.ClientSession() as s:
        accepted = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the refund window?"}]})
        tool = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "user", "content": "invoice 7"}], "tools": offer})
        corrected = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "user", "content": "How long do refunds take?"}]})
        rated = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "user", "content": "rate me"}]})
        superseded = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "user", "content": "twice"}]})
        await _feedback(target, s, REVIEWER, {"request_id": accepted, "accepted_answer": True, "comment": "correct"})
        await _feedback(target, s, REVIEWER, {"request_id": tool, "accepted_answer": True})
        await _feedback(target, s, REVIEWER, {"request_id": corrected, "correction": "Refunds are accepted within 30 days."})
        await _feedback(target, s, REVIEWER, {"request_id": rated, "rating": 4})
        await _feedback(target, s, REVIEWER, {"request_id": superseded, "accepted_answer": True})
        await _feedback(target, s, ALICE, {"request_id": superseded, "accepted_answer": False})

    reader = await AuditReader.open(Path(target.cfg.audit.path))
    try:
        res = await export_cases(reader)
        rated_too = await export_cases(reader, min_rating=4)
        other_tenant = await export_cases(reader, tenant="globex")
    finally:
        await reader.close()
    by_rid = {c.source["request_id"]: c for c in res.cases if c.source}
    assert set(by_rid) == {accepted, tool, corrected}
    assert res.skipped == {"not accepted and no correction": 2, "superseded by a later verdict": 1}
    assert len(rated_too.cases) == 4 and other_tenant.cases == []

    a = by_rid[accepted]
    assert a.principal == ALICE and a.model == "m1"
    assert a.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the refund window?"}]  # the injected context is not part of the case
    assert a.expect.cited == ("refunds",) and a.tags == ("from-audit", "accepted")
    src = a.source or {}
    assert src["reviewer"] == {"tenant": "acme", "subject": "rita", "groups": ["qa"]} and src["reviewed_at"] and src["comment"] == "correct"
    assert src["reference_answer"] == "Refunds are accepted within 30 days [1]."
    assert [t.name for t in by_rid[tool].expect.tool_calls] == ["lookup_invoice"] and by_rid[tool].tools
    c = by_rid[corrected]
    assert "needs-checks" in c.tags and (c.source or {})["reference_answer"] == "Refunds are accepted within 30 days."

    # The exported file loads back and its cases run through Warden again.
    out = tmp_path / "exported.yaml"
    out.write_text(yaml.safe_dump([x.as_dict() for x in res.cases]))
    cases = sorted(load_cases(out), key=lambda x: x.id)
    replies = {accepted: Reply(content="Within 30 days [1]."), tool: Reply(content=None, tool_calls=[{"name": "lookup_invoice", "arguments": '{"invoice_id": "7"}'}]),
               corrected: Reply(content="30 days.")}
    fake.push(*(replies[(x.source or {})["request_id"]] for x in cases))
    results = await run_cases(target, cases, RunOptions(concurrency=1))
    assert all(r.passed for r in results), [(r.case.id, [ch.as_dict() for ch in r.checks if not ch.passed]) for r in results]


async def test_export_command_writes_cases_and_says_what_it_skipped(target: InProcessTarget, fake: FakeProvider, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as s:
        rid = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "user", "content": "q"}]})
        await _feedback(target, s, REVIEWER, {"request_id": rid, "accepted_answer": True})
        rid2 = await _chat(target, s, ALICE, {"model": "m1", "messages": [{"role": "user", "content": "q2"}]})
        await _feedback(target, s, REVIEWER, {"request_id": rid2, "rating": -1})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "eval", "export", "--from-audit", "--db", target.cfg.audit.path, "-o", str(tmp_path / "x.jsonl"),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == f"1 case(s) written to {tmp_path / 'x.jsonl'}; skipped: 1 not accepted and no correction"
    cases = load_cases(tmp_path / "x.jsonl")
    assert [c.source["request_id"] for c in cases if c.source] == [rid]
