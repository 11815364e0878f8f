"""`warden demo`: the whole walk-through, run as a user runs it, and its transcript checked step by step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson

from llm_warden.proxy.demo.provider import LABEL, MODEL, script

ROOT = Path(__file__).resolve().parents[3]


def test_the_demo_walks_through_every_step_and_leaves_a_sealed_audit_log(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARDEN_", "OPENAI_"))}
    run = subprocess.run(
        [sys.executable, "-m", "llm_warden.proxy.cli", "demo", "--no-wait", "--port", "0", "--admin-port", "0", "--folder", str(folder)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert "✗" not in out
    steps = re.split(r"\n── \d\. ", out)
    assert len(steps) == 8, out  # the setup, then seven steps
    setup, grounded, two_users, read_only, approval, retry, limit, audit = steps
    assert "$ warden ingest docs/handbook --tenant acme --public" in setup
    assert "$ warden ingest docs/finance --tenant acme --allow-group finance" in setup
    # 1. a grounded, cited answer, labelled as the demo model's
    assert f"← 200: {LABEL}" in grounded and "50 EUR a day" in grounded and "[1]" in grounded
    assert "x-warden-citations: 1=handbook/travel.md" in grounded
    assert "✓ alice got an answer grounded" in grounded
    # 2. bob reads the finance document too; alice never does
    assert "finance/offsite-2026.md" in two_users and "80 EUR" in two_users
    assert "finance/offsite-2026.md" not in grounded and "80 EUR" not in grounded
    assert "✓ bob was given 2 documents" in two_users
    # 3. read-only: the write tool is refused by rule, and the application never gets the call
    assert "Warden's decision (audit record): refund → deny, rule policy.read_only" in read_only
    assert "✓ refund refused by rule policy.read_only; upstream turns: 2" in read_only
    # 4. held, approved through the admin API, then passed once
    assert re.search(r"refund → hold, rule tools\[\d\]\.approval_if", approval), approval
    held = re.search(r"pending (apr_\S+): refund", approval)
    assert held, approval
    assert f"{held.group(1)} approved by bootstrap-admin" in approval
    assert 'tool call for the application to run: refund({"invoice_id":"INV-1042","amount":250,"reason":"duplicate"})' in approval
    # 5. the retry replayed, the provider called once
    assert "x-warden-idempotent-replay: true; same answer: True" in retry and "✓ the retry was answered" in retry
    # 6. the fourth request of a 3/minute user
    assert "← 429: Retry-After:" in limit and "trial-users" in limit and "✓ request 4 was refused" in limit
    # 7. the audit log verifies while live, and shows the session
    assert "(live: a running Warden is writing it)" in audit and "OK: the chain and every checkpoint verify" in audit
    assert "WARNING" not in audit
    assert audit.count(" exchange ") >= 11 and "tools.approval.approve" in audit and "tools.mode" in audit
    assert "principal    tenant=acme subject=alice" in audit
    assert "Every step showed what it should." in out and f"Warden stopped; the demo folder stays: {folder}" in out

    # The log says it is a demo; Warden's request lines name the demo model.
    log = (folder / "warden.log").read_text()
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line["logger"] == "warden.demo" and "not a language model" in line["msg"] for line in lines)
    assert {line.get("model") for line in lines if line.get("msg") == "request"} == {MODEL}
    # Warden stopped cleanly: the log is sealed, no longer live, and verifies without a warning.
    verify = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", "audit", "verify", "--db", str(folder / "audit.db")],
                            env=env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "live" not in verify.stdout and "WARNING" not in verify.stdout, verify.stdout


def test_the_scripted_model_answers_from_the_injected_context_only() -> None:
    system = 'Context:\n<context n="1" doc="a.md" title="A">\nThe sky is green. More.\n</context>\n<context n="2" doc="b.md">\nWater is dry.\n</context>'
    reply = script({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "colours?"}]})
    assert reply.text == f"{LABEL} From the documents you may read: The sky is green. [1] Water is dry. [2]"
    assert script({"messages": [{"role": "user", "content": "anything"}]}).text == f"{LABEL} I have no documents to answer from, and I know nothing else."


def test_the_scripted_model_calls_a_named_tool_and_reports_warden_refusals() -> None:
    reply = script({"messages": [{"role": "user", "content": "refund 120.50 EUR on INV-7, fraud"}]})
    assert (reply.tool, reply.arguments) == ("refund", {"invoice_id": "INV-7", "amount": 120.5, "reason": "fraud"})
    reply = script({"messages": [{"role": "user", "content": "refund it"}, {"role": "tool", "tool_call_id": "c", "content": "Warden refused this call (rule x): no"}]})
    assert reply.text == f"{LABEL} I could not do that. Warden refused this call (rule x): no"
    assert script({"messages": []}).text == f"{LABEL} There is no message to answer."
