"""Run files, compare's regression rules and the reports, on run documents built from case results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llm_warden.proxy.eval.cases import parse_case
from llm_warden.proxy.eval.checks import CheckResult, Outcome
from llm_warden.proxy.eval.report import build_run, compare, html_report, junit_xml
from llm_warden.proxy.eval.runner import CaseResult


def _result(cid: str, passed: bool, latency: float = 100.0, tokens: int = 10, answer: str = "ok", cost: float | None = 0.01) -> CaseResult:
    case = parse_case({"id": cid, "principal": {"tenant": "t", "user": "u"}, "messages": [{"role": "user", "content": "q"}]}, cid)
    o = Outcome(status=200, request_id=f"req_{cid}", answer=answer, latency_ms=latency, usage={"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens})
    return CaseResult(case, o, [CheckResult("answered", True), CheckResult("answer.contains[0]", passed, "detail <b>")], cost)


def _run(tmp: Path, results: list[CaseResult]) -> dict[str, Any]:
    f = tmp / "cases.yaml"
    f.write_text("[]")
    return build_run(results, cases_file=str(f), target={"mode": "in-process"}, model="m", started=time.time())


def test_compare_regression_rules(tmp_path: Path) -> None:
    base = _run(tmp_path, [_result("a", True), _result("b", False), _result("c", True)])
    same = _run(tmp_path, [_result("a", True), _result("b", False), _result("c", True)])
    assert compare(base, same).regressions == []
    c = compare(base, _run(tmp_path, [_result("a", False), _result("b", True), _result("d", True)]))
    assert c.newly_failing == ["a"] and c.newly_passing == ["b"] and c.added == ["d"] and c.removed == ["c"]
    assert c.regressions == ["1 case(s) newly failing", "1 baseline case(s) missing from the candidate"]
    assert compare(base, _run(tmp_path, [_result("a", True), _result("b", False)]), allow_removed=True).regressions == []
    slow = _run(tmp_path, [_result(x, x != "b", latency=300.0, tokens=30, cost=0.05) for x in "abc"])
    c = compare(base, slow, max_latency_pct=50, max_cost_pct=100, max_tokens_pct=500)
    assert c.regressions == ["p95 latency grew 200.0 % (limit 50 %)", "cost grew 400.0 % (limit 100 %)"]
    assert c.deltas["total_tokens"] == {"baseline": 30, "candidate": 90, "change": 60, "change_pct": 200.0}


def test_reports_escape_what_the_model_and_the_cases_say(tmp_path: Path) -> None:
    hostile = '</pre><script>alert(1)</script><img src="https://evil.test/x">'
    run = _run(tmp_path, [_result("a", False, answer=hostile)])
    page = html_report(run, compare(run, run))
    assert "<script>" not in page and "<img" not in page and "&lt;script&gt;" in page
    assert "detail &lt;b&gt;" in page
    xml = junit_xml(run).decode()
    assert "&lt;b&gt;" in xml and 'failures="1"' in xml
