"""``warden eval``: ``run``, ``compare``, ``report``, ``export`` (see docs/evals.md).

Exit codes: 0 done (``run``: every case passed; ``compare``: no regression),
1 failures (``run``) or a regression (``compare``), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import yaml

from llm_warden.proxy.errors import ConfigError
from llm_warden.proxy.eval.cases import CaseError, load_cases
from llm_warden.proxy.eval.report import RunFileError, build_run, compare, compare_text, html_report, junit_xml, load_run
from llm_warden.proxy.eval.runner import InProcessTarget, RemoteTarget, RunOptions, Target, run_cases


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``eval`` (run, compare, report, export) to ``warden``."""
    ev = sub.add_parser("eval", help="golden sets and red-team suites run through Warden; compare runs")
    esub = ev.add_subparsers(dest="eval_command", required=True)

    p = esub.add_parser("run", help="run a case file through Warden and write one run file")
    p.add_argument("cases", help="case file (.yaml / .yml, or .jsonl)")
    p.add_argument("--out", "-o", required=True, help="run file to write (JSON)")
    p.add_argument("--url", help="a running Warden (default: start one in-process from --config)")
    p.add_argument("--signing-key", help="with --url: private key PEM that signs tokens Warden accepts (else [auth] hs256_secret_env)")
    p.add_argument("--audit-db", help="with --url: the audit store to read decisions from (default: the config's)")
    p.add_argument("--model", help="send every case to this model")
    p.add_argument("--price", help="USD per million tokens, PROMPT,COMPLETION (adds cost to the run)")
    p.add_argument("--baseline", help="a run file to compare against (adds the diff to --html and to the exit code)")
    _run_args(p)
    p.set_defaults(func=cmd_run)

    p = esub.add_parser("compare", help="what changed between two runs; exit 1 on a regression")
    p.add_argument("baseline", help="the run file to compare against (the known-good run)")
    p.add_argument("candidate", help="the new run file (e.g. the same cases against another model)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--allow-removed", action="store_true", help="a baseline case missing from the candidate is no regression")
    p.add_argument("--max-latency-regression", type=float, metavar="PCT", help="p95 latency may grow at most PCT %%")
    p.add_argument("--max-cost-regression", type=float, metavar="PCT", help="cost may grow at most PCT %%")
    p.add_argument("--max-token-regression", type=float, metavar="PCT", help="total tokens may grow at most PCT %%")
    p.set_defaults(func=cmd_compare)

    p = esub.add_parser("report", help="JUnit XML and/or HTML of a run file (optionally against a baseline)")
    p.add_argument("run", help="the run file (JSON) to report on")
    p.add_argument("--baseline", help="a run file to diff against in the HTML page")
    p.add_argument("--junit", help="write JUnit XML here")
    p.add_argument("--html", help="write the self-contained HTML page here")
    p.set_defaults(func=cmd_report)

    p = esub.add_parser("redteam", help="the adversarial suite (AgentDojo's attacks, OWASP LLM Top 10 ids) against an obedient model or a real one")
    p.add_argument("--out", "-o", required=True, help="run file to write (JSON, with the goals under 'redteam')")
    p.add_argument("--suites", default=",".join(("workspace", "slack", "banking", "travel")), help="AgentDojo suites (comma-separated)")
    p.add_argument("--per-suite", type=int, help="injection tasks per suite (default: all)")
    p.add_argument("--short", action="store_true", help="the CI form: one injection task per suite")
    p.add_argument("--upstream", help="a real provider's base URL (default: the obedient model, in-process)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="with --upstream: the environment variable holding its key")
    p.add_argument("--model", help="the model to ask (with --upstream)")
    _run_args(p)
    p.set_defaults(func=cmd_redteam)

    p = esub.add_parser("slo", help="retrieval's standing from the audit log: permission re-check, citation coverage, invalid citations, content age")
    p.add_argument("--db", help="audit database: a SQLite file or a postgresql:// URL (default: the config's)")
    p.add_argument("--since", default="24h", help="ISO time, epoch seconds, or an age like 24h (default 24h)")
    p.add_argument("--until", help="ISO time, epoch seconds, or an age like 1h (default: now)")
    p.add_argument("--min-citation-coverage", type=float, default=0.9, help="objective: share of answers with retrieved context that cite it")
    p.add_argument("--max-invalid-citation-rate", type=float, default=0.02, help="objective: share of citations naming a document that was not injected")
    p.add_argument("--max-content-age-p95-days", type=float, help="objective: p95 age of served content in days (default: not checked)")
    p.add_argument("--metrics-url", help="also the live standing of a running Warden: its admin listener's /metrics URL (targets from its [retrieval.slo])")
    p.add_argument("--json", action="store_true", help="print the standing as JSON")
    p.set_defaults(func=cmd_slo)

    p = esub.add_parser("export", help="cases from accepted feedback and corrections in the audit log")
    p.add_argument("--from-audit", action="store_true", required=True, help="read feedback records from the audit store")
    p.add_argument("--db", help="audit database: a SQLite file or a postgresql:// URL (default: the config's)")
    p.add_argument("--out", "-o", required=True, help="case file to write (.yaml or .jsonl)")
    p.add_argument("--tenant", help="only this tenant's feedback (default: every tenant)")
    p.add_argument("--since", help="ISO time, epoch seconds, or an age like 7d")
    p.add_argument("--until", help="ISO time, epoch seconds, or an age like 1d (default: now)")
    p.add_argument("--min-rating", type=int, help="feedback rated at least this counts as accepted")
    p.set_defaults(func=cmd_export)


def _run_args(p: argparse.ArgumentParser) -> None:
    """What every command that runs cases takes: concurrency, timeout, reports, progress."""
    p.add_argument("--concurrency", type=int, default=4, help="cases in flight at once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    p.add_argument("--junit", help="also write JUnit XML here")
    p.add_argument("--html", help="also write the HTML report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")


def _fail(msg: str) -> int:
    print(f"warden eval: {msg}", file=sys.stderr)
    return 2


def _price(v: str | None) -> tuple[float | None, float | None]:
    if not v:
        return None, None
    try:
        a, b = (float(x) for x in v.split(","))
    except ValueError:
        raise ConfigError("--price", "expects PROMPT,COMPLETION in USD per million tokens, e.g. 0.15,0.60") from None
    return a, b


def _write(path: str, data: bytes | str) -> None:
    Path(path).write_bytes(data.encode() if isinstance(data, str) else data)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cases = load_cases(args.cases)
        baseline = load_run(args.baseline) if args.baseline else None
    except (CaseError, RunFileError) as e:
        return _fail(str(e))
    if not args.config:
        return _fail("--config FILE is required (the Warden to run in-process, or the --url Warden's auth and audit)")
    if args.concurrency < 1:
        return _fail("--concurrency must be at least 1")
    pin, pout = _price(args.price)
    opts = RunOptions(model=args.model, concurrency=args.concurrency, timeout_s=args.timeout, price_prompt_per_mtok=pin, price_completion_per_mtok=pout, progress=None if args.no_progress else sys.stderr)
    try:
        signing_key = Path(args.signing_key).read_bytes() if args.signing_key else None
    except OSError as e:
        return _fail(f"cannot read --signing-key: {e}")
    started = time.time()

    async def go() -> list[Any]:
        target: Target
        if args.url:
            target = await RemoteTarget.open(args.url, args.config, signing_key, args.audit_db)
        else:
            target = await InProcessTarget.start(args.config)
        try:
            return await run_cases(target, cases, opts)
        finally:
            await target.close()

    results = asyncio.run(go())
    run = build_run(results, cases_file=args.cases, target={"mode": "url" if args.url else "in-process", "url": args.url, "config": str(args.config)}, model=args.model, started=started)
    _write(args.out, orjson.dumps(run, option=orjson.OPT_INDENT_2))
    comparison = compare(baseline, run) if baseline is not None else None
    if args.junit:
        _write(args.junit, junit_xml(run))
    if args.html:
        _write(args.html, html_report(run, comparison))
    s = run["summary"]
    print(f"{s['passed']}/{s['cases']} cases passed ({s['checks_passed']}/{s['checks']} checks); latency p50 {s['latency_ms']['p50']} ms; run file {args.out}")
    for r in run["results"]:
        if not r["passed"]:
            failed = [c for c in r["checks"] if not c["passed"]]
            print(f"  FAIL {r['id']}: " + "; ".join(f"{c['name']} ({c['detail']})" for c in failed[:3]))
    if comparison is not None:
        print(compare_text(comparison))
        return 1 if comparison.regressions else 0
    return 0 if s["failed"] == 0 else 1


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_run(args.baseline), load_run(args.candidate)
    except RunFileError as e:
        return _fail(str(e))
    c = compare(a, b, allow_removed=args.allow_removed, max_latency_pct=args.max_latency_regression, max_cost_pct=args.max_cost_regression, max_tokens_pct=args.max_token_regression)
    print(orjson.dumps(c.as_dict(), option=orjson.OPT_INDENT_2).decode() if args.json else compare_text(c))
    return 1 if c.regressions else 0


def cmd_report(args: argparse.Namespace) -> int:
    if not args.junit and not args.html:
        return _fail("give --junit PATH and/or --html PATH")
    try:
        run = load_run(args.run)
        comparison = compare(load_run(args.baseline), run) if args.baseline else None
    except RunFileError as e:
        return _fail(str(e))
    if args.junit:
        _write(args.junit, junit_xml(run))
    if args.html:
        _write(args.html, html_report(run, comparison))
    return 0


def cmd_redteam(args: argparse.Namespace) -> int:
    from llm_warden.proxy.eval.corpus import CorpusUnavailable, load_agentdojo
    from llm_warden.proxy.eval.redteam import build_suite, run_redteam

    if args.concurrency < 1:
        return _fail("--concurrency must be at least 1")
    try:
        corpus = load_agentdojo(tuple(x.strip() for x in args.suites.split(",") if x.strip()))
    except (CorpusUnavailable, ValueError) as e:
        return _fail(str(e))
    suite = build_suite(corpus, 1 if args.short else args.per_suite)
    opts = RunOptions(model=args.model, concurrency=args.concurrency, timeout_s=args.timeout, progress=None if args.no_progress else sys.stderr)
    started = time.time()
    results, goals = asyncio.run(run_redteam(suite, opts, upstream=args.upstream, api_key_env=args.api_key_env if args.upstream else None))
    target = {"mode": "in-process", "model": "real" if args.upstream else "obedient", "upstream": args.upstream, "corpus": corpus.source}
    run = build_run(results, cases_file=f"redteam:{args.suites}", target=target, model=args.model, started=started)
    run["redteam"] = goals
    _write(args.out, orjson.dumps(run, option=orjson.OPT_INDENT_2))
    if args.junit:
        _write(args.junit, junit_xml(run))
    if args.html:
        _write(args.html, html_report(run))
    print(f"{len(results)} adversarial cases from {corpus.source}; attack success rate {goals['attack_success_rate']:.1%}")
    print(f"forbidden tool calls relayed {goals['forbidden_tool_calls_relayed']}, hidden documents injected or cited {goals['hidden_documents_injected_or_cited']}, "
          f"secrets echoed {goals['secrets_echoed']}: goals {'met' if goals['met'] else 'MISSED'}")
    for k, v in goals["owasp"].items():
        print(f"  {k} {v['name']}: {v['cases']} cases, {v['failed']} failed")
    for f in goals["failures"][:20]:
        print(f"  MISSED {f['case']}: relayed {f['relayed']}, hidden documents {f['hidden_docs']}, secrets echoed {f['secrets_echoed']}")
    return 0 if goals["met"] else 1


def _over_audit(args: argparse.Namespace, query: Callable[[Any, int | None, int | None], Awaitable[Any]]) -> Any:
    """``query(reader, since, until)`` over the audit store of ``--db`` / the config; a string says why it could not run."""
    from llm_warden.proxy.audit.cli import _db_path, parse_time
    from llm_warden.proxy.audit.reader import open_reader

    try:
        since, until = parse_time(args.since), parse_time(args.until)
    except ValueError as e:
        return str(e)
    target = _db_path(args)

    async def go() -> Any:
        try:
            reader = await open_reader(target)
        except (FileNotFoundError, ConnectionError) as e:
            return str(e)
        try:
            return await query(reader, since, until)
        finally:
            await reader.close()

    return asyncio.run(go())


def _scrape(url: str) -> str:
    """The text of a ``/metrics`` URL (http or https only; 10 s timeout)."""
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError("--metrics-url must be an http:// or https:// URL")
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - the scheme is checked above
        body: bytes = r.read(64 * 1024 * 1024)
    return body.decode("utf-8", "replace")


_MARK = {True: "met", False: "MISSED"}


def _print_audit_standing(res: dict[str, Any]) -> None:
    pc, cc, ic, age = res["permission_correctness"], res["citation_coverage"], res["invalid_citation_rate"], res["content_age_days"]
    mark = _MARK
    print(f"permission correctness  {pc['correct']}/{pc['checked'] - pc['unverifiable']} verifiable injected documents allowed "
          f"({pc['violation_count']} violations, {pc['unverifiable']} unverifiable), target 100 %: {mark[res['met']['permission_correctness']]}")
    for v in pc["violations"][:20]:
        print(f"  VIOLATION {v['request_id']}: {v['doc_id']}: {v['why']}")
    print(f"citation coverage       {cc['covered']}/{cc['exchanges_with_context']} answers with context cite it, target {cc['target']:.0%}: {mark[res['met']['citation_coverage']]}")
    print(f"invalid citations       {ic['invalid']}/{ic['citations']}, target at most {ic['target']:.0%}: {mark[res['met']['invalid_citation_rate']]}")
    print(f"served-content age      p50 {age['p50']} d, p95 {age['p95']} d over {age['served']} injected chunks: {mark[res['met']['content_age']]}")


def _print_live_standing(res: dict[str, Any]) -> None:
    met = res["met"]
    for stage in ("ingest_to_servable", "source_to_servable"):
        f = res[f"freshness_{stage}"]
        p95 = "-" if f["p95_s"] is None else f"{f['p95_s']:g} s"
        print(f"freshness {stage.replace('_', ' '):<22} p95 {p95} over {f['observed']} document versions, target {f['target_p95_s']:g} s: {_MARK[met[f'freshness_{stage}']]}")
    pc, cc, ic = res["permission_correctness"], res["citation_coverage"], res["invalid_citation_rate"]
    print(f"permission correctness  {pc['checked'] - pc['violations']}/{pc['checked']} injected chunks re-checked ok ({pc['violations']} removed), "
          f"target 100 %: {_MARK[met['permission_correctness']]}")
    print(f"citation coverage       {cc['cited']}/{cc['answers_with_context']} answers with context cite it, target {cc['target']:.0%}: {_MARK[met['citation_coverage']]}")
    print(f"invalid citations       {ic['invalid']}/{ic['citations']}, target at most {ic['target']:.0%}: {_MARK[met['invalid_citation_rate']]}")


def cmd_slo(args: argparse.Namespace) -> int:
    from llm_warden.proxy.eval.slo import Targets, metrics_standing, standing

    live: dict[str, Any] | None = None
    if args.metrics_url:
        try:
            live = metrics_standing(_scrape(args.metrics_url))
        except (OSError, ValueError) as e:
            return _fail(f"cannot read the standing from {args.metrics_url}: {e}")
    res: dict[str, Any] | None = None
    if live is None or args.db or args.config:
        targets = Targets(args.min_citation_coverage, args.max_invalid_citation_rate, args.max_content_age_p95_days)
        got = _over_audit(args, lambda reader, since, until: standing(reader, since, until, targets))
        if isinstance(got, str):
            return _fail(got)
        res = got
    if args.json:
        doc = res if live is None else {"audit_log": res, "metrics": live}
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        if res is not None:
            if live is not None:
                print("From the audit log:")
            _print_audit_standing(res)
        if live is not None:
            print(f"{'' if res is None else chr(10)}Live, from {args.metrics_url} (since that Warden started):")
            _print_live_standing(live)
    ok = (res is None or res["all_met"]) and (live is None or live["all_met"])
    return 0 if ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from llm_warden.proxy.eval.export import export_cases

    res = _over_audit(args, lambda reader, since, until: export_cases(reader, tenant=args.tenant, since=since, until=until, min_rating=args.min_rating))
    if isinstance(res, str):
        return _fail(res)
    docs = [c.as_dict() for c in res.cases]
    if args.out.endswith(".jsonl"):
        _write(args.out, b"".join(orjson.dumps(d) + b"\n" for d in docs))
    else:
        _write(args.out, yaml.safe_dump(docs, sort_keys=False, allow_unicode=True))
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(res.skipped.items()))
    print(f"{len(docs)} case(s) written to {args.out}" + (f"; skipped: {skipped}" if skipped else ""))
    return 0
