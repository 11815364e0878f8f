"""``warden policy test CASES``: run declarative cases against a tool policy, for CI.

The policy is the ``[policy]`` and ``[[tools]]`` of a TOML file: ``--policy
FILE``, else the ``policy`` the case file names (relative to it), else
``--config``.  Exit status: 0 when every case passed, 1 when one failed, 2
when the case file or the policy is invalid (the message says which case or
key, and why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from llm_warden.plugins.tools.cases import CaseError, Outcome, load_policy, read_cases, run_case
from llm_warden.proxy.errors import ConfigError

_REASON_SHOWN = 300


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("policy", help="tool policy tools (warden policy test CASES)")
    psub = p.add_subparsers(dest="policy_command", required=True)
    t = psub.add_parser("test", help="run declarative cases (YAML or JSON Lines) against the tool policy; exit 1 on a failure")
    t.add_argument("cases", type=Path, help="the case file (.yaml/.yml/.json, or .jsonl with one case per line)")
    t.add_argument("--policy", type=Path, default=None, help="TOML file whose [policy] and [[tools]] are tested (default: the case file's 'policy', else --config)")
    t.add_argument("--quiet", "-q", action="store_true", help="print only failures and the summary")
    t.set_defaults(func=policy_test)


def _line(o: Outcome) -> str:
    d = o.decision
    verdict = f"{d.kind} ({d.rule})"
    dep = d.details.get("deprecation") if d.details is not None else None
    if dep is not None and not dep.get("retired"):
        verdict += " [deprecated]"
    if o.passed:
        return f"  ok    {o.case.number:>3}  {o.case.name}: {verdict}"
    out = f"  FAIL  {o.case.number:>3}  {o.case.name}: {'; '.join(o.problems)}"
    if d.reason:
        reason = d.reason if len(d.reason) <= _REASON_SHOWN else d.reason[:_REASON_SHOWN] + "..."
        out += f"\n              got {verdict}: {reason}"
    return out


def run(cases_path: Path, policy_path: Path | None, config_path: str | None, out: TextIO, err: TextIO, quiet: bool = False) -> int:
    """Run a case file and print the report; returns the exit status."""
    try:
        chosen = policy_path
        if chosen is None:
            # The policy's own read_only default only matters once the policy is known: read the file twice.
            probe = read_cases(cases_path, default_read_only=True)
            chosen = probe.policy or (Path(config_path) if config_path else None)
        if chosen is None:
            print("warden policy test: no policy: pass --policy FILE, name one in the case file ('policy:'), or give --config", file=err)
            return 2
        policy = load_policy(chosen)
        cases = read_cases(cases_path, default_read_only=policy.policy.read_only)
        outcomes = [run_case(policy, c) for c in cases.cases]
    except CaseError as e:
        print(f"warden policy test: {cases_path}: {e}", file=err)
        return 2
    except ConfigError as e:
        print(f"warden policy test: policy {chosen}: {e}", file=err)
        return 2
    failed = [o for o in outcomes if not o.passed]
    print(f"policy {chosen} ({len(policy.registry)} tools), cases {cases_path}", file=out)
    for o in outcomes:
        if not quiet or not o.passed:
            print(_line(o), file=out)
    print(f"{len(outcomes)} cases: {len(outcomes) - len(failed)} passed, {len(failed)} failed", file=out)
    return 1 if failed else 0


def policy_test(args: argparse.Namespace) -> int:
    return run(args.cases, args.policy, args.config, sys.stdout, sys.stderr, quiet=args.quiet)
