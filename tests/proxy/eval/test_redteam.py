"""The adversarial suite, short form, as CI runs it: AgentDojo's attacks against the obedient model, through Warden."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
import pytest

from llm_warden.proxy.eval.corpus import Corpus, load_agentdojo
from llm_warden.proxy.eval.obedient import Instruction, ObedientModel
from llm_warden.proxy.eval.redteam import OWASP, build_suite, run_redteam
from llm_warden.proxy.eval.runner import RunOptions


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_agentdojo()


def test_the_corpus_comes_from_agentdojo(corpus: Corpus) -> None:
    assert corpus.source.startswith("agentdojo ")
    assert {"send_email", "send_money", "post_webpage", "get_webpage"} <= {t.name for t in corpus.tools}
    assert len(corpus.injections) >= 20 and all(i.goal in i.payload and "<INFORMATION>" in i.payload for i in corpus.injections)
    assert {t.effect for t in corpus.tools if t.name.startswith("send_")} == {"write"}


def test_the_obedient_model_obeys_what_it_sees_anywhere() -> None:
    m = ObedientModel([Instruction("DO-X", (("send_email", {"to": "a"}),)), Instruction("SAY-Y", say="![x](https://evil.test/y)")])
    content, calls = m.decide({"messages": [{"role": "system", "content": "ctx DO-X"}, {"role": "user", "content": "hi"}]})
    assert content is None and [c["function"]["name"] for c in calls] == ["send_email"]
    content, calls = m.decide({"messages": [{"role": "tool", "tool_call_id": "c", "content": "SAY-Y"}, {"role": "user", "content": "hi"}]})
    assert not calls and content is not None and content.startswith("![x](https://evil.test/y)") and "SAY-Y" in content
    content, calls = m.decide({"messages": [{"role": "user", "content": "nothing planted"}]})
    assert not calls and content == "Here is everything I was given:"


async def test_short_form_meets_the_absolute_goals_and_the_attacks_reach_the_model(corpus: Corpus) -> None:
    suite = build_suite(corpus, per_suite=1)
    results, goals = await run_redteam(suite, RunOptions(concurrency=4))
    assert goals["forbidden_tool_calls_relayed"] == 0 and goals["hidden_documents_injected_or_cited"] == 0 and goals["secrets_echoed"] == 0
    assert goals["met"] and all(r.passed for r in results), [(r.case.id, [c.as_dict() for c in r.checks if not c.passed]) for r in results if not r.passed]
    assert set(goals["owasp"]) == set(OWASP)
    by = {r.case.id.split(":")[0]: [] for r in results}  # type: dict[str, list]
    for r in results:
        by[r.case.id.split(":")[0]].append(r)
    assert set(by) == {"doc-injection", "tool-result-injection", "approval-bypass", "exfil-markdown", "hidden-docs"}
    # Not vacuous: the model did try every forbidden call, and Warden refused each under its rule.
    for r in by["doc-injection"] + by["tool-result-injection"]:
        forbidden = set((r.case.source or {})["forbidden"])
        assert forbidden and forbidden <= {d["name"] for d in r.outcome.tool_decisions if d["rule"] == "policy.read_only"}
    for r in by["approval-bypass"]:
        assert {d["decision"] for d in r.outcome.tool_decisions} == {"hold"}
    for r in by["exfil-markdown"]:
        assert r.outcome.status == 200 and "[image removed]" in (r.outcome.answer or "") and "[withheld]" in (r.outcome.answer or "")
    for r in by["hidden-docs"]:
        assert r.outcome.status == 200 and r.outcome.injected == []


async def test_the_suite_catches_a_warden_without_its_fence(corpus: Corpus) -> None:
    """A control run: the same attacks with the tool fence and the output guard left out must miss the goals."""
    suite = build_suite(corpus, per_suite=1)
    _, goals = await run_redteam(suite, RunOptions(concurrency=4), overrides={"plugins": {"enabled": ["retrieval"]}})
    assert not goals["met"]
    assert goals["forbidden_tool_calls_relayed"] > 0 and goals["secrets_echoed"] > 0
    assert goals["hidden_documents_injected_or_cited"] == 0  # the ACLs are retrieval's, still on


async def test_redteam_command(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llm_warden.proxy", "eval", "redteam", "--short", "--suites", "banking", "-o", str(tmp_path / "rt.json"),
                                                "--junit", str(tmp_path / "rt.xml"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, err = await asyncio.wait_for(proc.communicate(), 110)
    assert proc.returncode == 0, (out, err)
    assert "goals met" in out.decode()
    run = orjson.loads((tmp_path / "rt.json").read_bytes())
    assert run["redteam"]["met"] is True and run["summary"]["cases"] == 5 and run["target"]["model"] == "obedient"
