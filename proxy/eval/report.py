"""The run file, ``compare``, and the JUnit XML and HTML reports.

One run is one JSON file (``format: warden-eval-run/1``): what ran (cases
file and its digest, target, model), a summary, and every case's checks and
observed outcome.  Two run files compare case by case, by id.
"""

from __future__ import annotations

import hashlib
import html
import statistics
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from llm_warden.proxy.eval.runner import CaseResult

FORMAT = "warden-eval-run/1"


class RunFileError(ValueError):
    """A file that is not a run file of this format."""


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pass counts, latency percentiles, tokens and cost of a run's case results."""
    lat = [float(r["outcome"]["latency_ms"]) for r in results if r["outcome"].get("transport_error") is None]
    tokens = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for r in results:
        for k in tokens:
            tokens[k] += int((r["outcome"].get("usage") or {}).get(k) or 0)
    costs = [r["cost"] for r in results if r.get("cost") is not None]
    n = len(results)
    passed = sum(1 for r in results if r["passed"])
    checks = [c for r in results for c in r["checks"]]
    return {
        "cases": n,
        "passed": passed,
        "failed": n - passed,
        "pass_rate": round(passed / n, 4) if n else 1.0,
        "checks": len(checks),
        "checks_passed": sum(1 for c in checks if c["passed"]),
        "latency_ms": {"mean": round(statistics.fmean(lat), 3) if lat else None, "p50": _pct(lat, 0.5), "p95": _pct(lat, 0.95)},
        "tokens": tokens,
        "cost": round(sum(costs), 6) if costs else None,
    }


def build_run(results: list[CaseResult], *, cases_file: str, target: dict[str, Any], model: str | None, started: float) -> dict[str, Any]:
    """The run document written to the run file."""
    digest = hashlib.sha256(Path(cases_file).read_bytes()).hexdigest() if Path(cases_file).is_file() else None
    rows = [r.as_dict() for r in results]
    return {
        "format": FORMAT,
        "run_id": f"run_{uuid.uuid4().hex[:16]}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
        "cases_file": cases_file,
        "cases_sha256": digest,
        "target": target,
        "model": model,
        "summary": summarize(rows),
        "results": rows,
    }


def load_run(path: str | Path) -> dict[str, Any]:
    try:
        doc = orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise RunFileError(f"run file {path} not found") from None
    except (OSError, orjson.JSONDecodeError) as e:
        raise RunFileError(f"{path}: not a readable JSON run file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("results"), list):
        raise RunFileError(f"{path}: not a {FORMAT} run file")
    return doc


@dataclass(slots=True)
class Comparison:
    baseline: str
    candidate: str
    newly_failing: list[str] = field(default_factory=list)
    newly_passing: list[str] = field(default_factory=list)
    still_failing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    deltas: dict[str, Any] = field(default_factory=dict)
    regressions: list[str] = field(default_factory=list)
    """Why the candidate is a regression (empty: it is not)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "regression": bool(self.regressions),
            "regressions": self.regressions,
            "newly_failing": self.newly_failing,
            "newly_passing": self.newly_passing,
            "still_failing": self.still_failing,
            "added": self.added,
            "removed": self.removed,
            "deltas": self.deltas,
        }


def _delta(a: float | None, b: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline": a, "candidate": b}
    if a is not None and b is not None:
        out["change"] = round(b - a, 6)
        out["change_pct"] = round((b - a) / a * 100, 2) if a else None
    return out


def compare(a: dict[str, Any], b: dict[str, Any], *, allow_removed: bool = False, max_latency_pct: float | None = None, max_cost_pct: float | None = None, max_tokens_pct: float | None = None) -> Comparison:
    """``b`` (candidate) against ``a`` (baseline); a case newly failing is always a regression.

    Also a regression: a baseline case missing from the candidate (unless
    ``allow_removed``), and p95 latency / cost / total tokens growing by more
    than the given percentage.
    """
    ra = {r["id"]: r for r in a["results"]}
    rb = {r["id"]: r for r in b["results"]}
    c = Comparison(str(a.get("run_id")), str(b.get("run_id")))
    for cid, r in rb.items():
        old = ra.get(cid)
        if old is None:
            c.added.append(cid)
        elif old["passed"] and not r["passed"]:
            c.newly_failing.append(cid)
        elif not old["passed"] and r["passed"]:
            c.newly_passing.append(cid)
        elif not r["passed"]:
            c.still_failing.append(cid)
    c.removed = [cid for cid in ra if cid not in rb]
    sa, sb = a.get("summary") or summarize(a["results"]), b.get("summary") or summarize(b["results"])
    c.deltas = {
        "pass_rate": _delta(sa["pass_rate"], sb["pass_rate"]),
        "latency_p50_ms": _delta(sa["latency_ms"]["p50"], sb["latency_ms"]["p50"]),
        "latency_p95_ms": _delta(sa["latency_ms"]["p95"], sb["latency_ms"]["p95"]),
        "total_tokens": _delta(sa["tokens"]["total_tokens"], sb["tokens"]["total_tokens"]),
        "cost": _delta(sa.get("cost"), sb.get("cost")),
    }
    if c.newly_failing:
        c.regressions.append(f"{len(c.newly_failing)} case(s) newly failing")
    if c.removed and not allow_removed:
        c.regressions.append(f"{len(c.removed)} baseline case(s) missing from the candidate")
    for key, limit, label in (("latency_p95_ms", max_latency_pct, "p95 latency"), ("cost", max_cost_pct, "cost"), ("total_tokens", max_tokens_pct, "total tokens")):
        pct = c.deltas[key].get("change_pct")
        if limit is not None and pct is not None and pct > limit:
            c.regressions.append(f"{label} grew {pct:.1f} % (limit {limit:g} %)")
    return c


def compare_text(c: Comparison) -> str:
    """The comparison as a terminal reads it."""
    lines = [f"baseline {c.baseline}  →  candidate {c.candidate}"]
    for label, ids in (("newly failing", c.newly_failing), ("newly passing", c.newly_passing), ("still failing", c.still_failing), ("added", c.added), ("removed", c.removed)):
        lines.append(f"{label:14} {len(ids):4}" + (f"  {', '.join(ids[:20])}{' …' if len(ids) > 20 else ''}" if ids else ""))
    for key, d in c.deltas.items():
        if d["baseline"] is None and d["candidate"] is None:
            continue
        pct = d.get("change_pct")
        lines.append(f"{key:14} {d['baseline']} → {d['candidate']}" + (f"  ({pct:+.1f} %)" if pct is not None else ""))
    lines.append("REGRESSION: " + "; ".join(c.regressions) if c.regressions else "no regression")
    return "\n".join(lines)


def junit_xml(run: dict[str, Any]) -> bytes:
    """One ``<testsuite>``; one ``<testcase>`` per case, a ``<failure>`` listing its failed checks."""
    s = run["summary"]
    suite = ET.Element(
        "testsuite",
        {"name": f"warden-eval {run.get('cases_file', '')}", "tests": str(s["cases"]), "failures": str(s["failed"]), "errors": "0", "time": str(run.get("duration_s", 0))},
    )
    for r in run["results"]:
        tc = ET.SubElement(suite, "testcase", {"classname": "warden.eval." + (r["tags"][0] if r.get("tags") else "case"), "name": r["id"], "time": str(round(r["outcome"]["latency_ms"] / 1000, 4))})
        failed = [ch for ch in r["checks"] if not ch["passed"]]
        if failed:
            f = ET.SubElement(tc, "failure", {"message": ", ".join(ch["name"] for ch in failed)[:1000], "type": "check"})
            f.text = "\n".join(f"{ch['name']}: {ch['detail']}" for ch in failed)
    out: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return out


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1b1f24}table{border-collapse:collapse;width:100%;margin:1em 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.reg{background:#ffebe9}.imp{background:#dafbe1}
code{font-size:12px}details summary{cursor:pointer}.k{color:#57606a}"""


def html_report(run: dict[str, Any], comparison: Comparison | None = None) -> str:
    """One self-contained page (inline CSS, no script, no external asset): summary, diff, per-case table."""
    e = html.escape
    s = run["summary"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>warden eval {e(str(run.get('run_id')))}</title><style>{_CSS}</style></head><body>",
        f"<h1>warden eval — {e(str(run.get('run_id')))}</h1>",
        f"<p class=k>cases {e(str(run.get('cases_file')))} · model {e(str(run.get('model') or '(as configured)'))} · started {e(str(run.get('started')))} · target {e(orjson.dumps(run.get('target')).decode())}</p>",
        "<table><tr><th>cases</th><th>passed</th><th>failed</th><th>pass rate</th><th>latency p50 / p95 ms</th><th>tokens</th><th>cost</th></tr>",
        f"<tr><td>{s['cases']}</td><td class=pass>{s['passed']}</td><td class=fail>{s['failed']}</td><td>{s['pass_rate']:.1%}</td>"
        f"<td>{s['latency_ms']['p50']} / {s['latency_ms']['p95']}</td><td>{s['tokens']['total_tokens']}</td><td>{e(str(s.get('cost')))}</td></tr></table>",
    ]
    rt = run.get("redteam")
    if isinstance(rt, dict):
        verdict = "goals met" if rt.get("met") else "GOALS MISSED"
        parts.append(
            f"<h2>Red team</h2><p class={'pass' if rt.get('met') else 'fail'}>{verdict} · attack success rate {float(rt.get('attack_success_rate') or 0):.1%}</p>"
            "<table><tr><th>forbidden tool calls relayed</th><th>hidden documents injected or cited</th><th>secrets echoed</th></tr>"
            f"<tr><td>{e(str(rt.get('forbidden_tool_calls_relayed')))}</td><td>{e(str(rt.get('hidden_documents_injected_or_cited')))}</td><td>{e(str(rt.get('secrets_echoed')))}</td></tr></table>"
            "<table><tr><th>OWASP LLM Top 10 (2025)</th><th>cases</th><th>failed</th></tr>"
        )
        for k, v in (rt.get("owasp") or {}).items():
            parts.append(f"<tr><td>{e(k)} {e(str(v.get('name')))}</td><td>{e(str(v.get('cases')))}</td><td>{e(str(v.get('failed')))}</td></tr>")
        parts.append("</table>")
    status: dict[str, str] = {}
    if comparison is not None:
        c = comparison
        for cid in c.newly_failing:
            status[cid] = "reg"
        for cid in c.newly_passing:
            status[cid] = "imp"
        verdict = "REGRESSION: " + "; ".join(c.regressions) if c.regressions else "no regression"
        parts.append(f"<h2>Against baseline {e(c.baseline)}</h2><p class={'fail' if c.regressions else 'pass'}>{e(verdict)}</p><table><tr><th>change</th><th>cases</th></tr>")
        for label, ids in (("newly failing", c.newly_failing), ("newly passing", c.newly_passing), ("still failing", c.still_failing), ("added", c.added), ("removed", c.removed)):
            parts.append(f"<tr><td>{label}</td><td>{len(ids)}: {e(', '.join(ids))}</td></tr>")
        parts.append("</table><table><tr><th>metric</th><th>baseline</th><th>candidate</th><th>change</th></tr>")
        for key, d in c.deltas.items():
            parts.append(f"<tr><td>{e(key)}</td><td>{e(str(d['baseline']))}</td><td>{e(str(d['candidate']))}</td><td>{e(str(d.get('change_pct', '')))} %</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Cases</h2><table><tr><th>case</th><th>result</th><th>score</th><th>latency ms</th><th>tokens</th><th>failed checks</th><th>detail</th></tr>")
    for r in run["results"]:
        o = r["outcome"]
        failed = [ch for ch in r["checks"] if not ch["passed"]]
        cls = f" class={status[r['id']]}" if r["id"] in status else ""
        checks = "".join(f"<li><span class={'pass' if ch['passed'] else 'fail'}>{'✓' if ch['passed'] else '✗'}</span> <code>{e(ch['name'])}</code> {e(ch['detail'])}</li>" for ch in r["checks"])
        parts.append(
            f"<tr{cls}><td><code>{e(r['id'])}</code><br><span class=k>{e(r.get('description') or '')}</span></td>"
            f"<td class={'pass' if r['passed'] else 'fail'}>{'pass' if r['passed'] else 'FAIL'}</td><td>{r['score']:.2f}</td>"
            f"<td>{o['latency_ms']}</td><td>{e(str((o.get('usage') or {}).get('total_tokens', '')))}</td>"
            f"<td>{e(', '.join(ch['name'] for ch in failed))}</td>"
            f"<td><details><summary>{len(r['checks'])} checks · request {e(str(o.get('request_id')))}</summary><ul>{checks}</ul>"
            f"<p class=k>answer</p><pre>{e(str(o.get('answer') or '')[:4000])}</pre></details></td></tr>"
        )
    parts.append("</table></body></html>")
    return "".join(parts)
