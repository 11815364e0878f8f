"""``warden audit show|search|export|verify`` through the real CLI entry point."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.cli import main
from llm_warden.proxy.config import AuditConfig
from llm_warden.proxy.exchange import Decision, ToolCall, ToolDecisionRecord
from tests.proxy.audit.helpers import make_exchange

ROOT = Path(__file__).resolve().parents[3]


def _populate(path: Path) -> None:
    async def run() -> None:
        log = SQLiteAuditLog(AuditConfig(checkpoint_every=4, checkpoint_file=str(path) + ".cp", store_content="full"), path)
        await log.start()
        first = make_exchange(request_id="req_a", tenant="acme", subject="alice")
        first.tool_decisions = [
            ToolDecisionRecord(0, ToolCall("call_77", "lookup_order", '{"id": 7}'), Decision.allow("tools.lookup_order"))
        ]
        await log.record_exchange(first)
        second = make_exchange(request_id="req_b", tenant="acme", subject="bob", tool="refund")
        second.tool_decisions[0].decision = Decision.deny("tools.refund.policy", "refunds need approval")
        second.tool_results = [{"tool_call_id": "call_77", "content": '{"status": "shipped"}'}]
        await log.record_exchange(second)
        await log.record_exchange(make_exchange(request_id="req_c", tenant="globex", subject="carol"))
        await log.record_event(
            "feedback", {"tenant": "acme", "subject": "rev"}, {"request_id": "req_b", "rating": -1, "comment": "wrong", "correction": None}
        )
        await log.stop()

    asyncio.run(run())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    _populate(path)
    return path


def test_show_prints_the_trace(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "show", "req_b", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "exchange req_b" in out and "tenant=acme subject=bob" in out
    assert "refund" in out and "deny [rule tools.refund.policy] refunds need approval" in out
    assert "tool result  call_77 (call made in req_a)" in out
    assert "feedback" in out and "wrong" in out
    assert "> system:" in out and "< {" in out


def test_show_json_and_unknown_request(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "show", "req_a", "--db", str(db), "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert data["record"]["request_id"] == "req_a"
    assert main(["audit", "show", "nope", "--db", str(db)]) == 2
    assert "no exchange 'nope'" in capsys.readouterr().err


def test_search_filters(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "search", "--db", str(db), "--tenant", "acme", "--kind", "exchange", "--json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["request_id"] for r in rows] == ["req_b", "req_a"]
    assert main(["audit", "search", "--db", str(db), "--tool", "refund", "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "req_b" in out and "req_a" not in out
    assert main(["audit", "search", "--db", str(db), "--until", "2000-01-01T00:00:00Z"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "search", "--db", str(db), "--since", "yesterday-ish"]) == 2


def test_export_jsonl_reproduces_the_hashes(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llm_warden.proxy.audit.chain import canonical, leaf_hash

    out = tmp_path / "export.jsonl"
    assert main(["audit", "export", "--format", "jsonl", "--db", str(db), "-o", str(out)]) == 0
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3, 4]
    for x in lines:
        assert leaf_hash(bytes.fromhex(x["prev_hash"]), x["seq"], canonical(x["record"])).hex() == x["hash"]


def test_verify_ok_then_fault(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--db", str(db), "--checkpoint", str(db) + ".cp"]) == 0
    assert "OK" in capsys.readouterr().out
    pub = db.with_name(db.name + ".ed25519.pub")
    assert main(["audit", "verify", "--db", str(db), "--key", str(pub), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["ok"] is True
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER records_no_delete")
    conn.execute("DELETE FROM records WHERE seq = 2")
    conn.commit()
    conn.close()
    assert main(["audit", "verify", "--db", str(db)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: first fault: deleted at seq 3" in out


def test_verify_through_the_installed_entry_point(db: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "llm_warden.proxy", "audit", "verify", "--db", str(db)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "OK: the chain and every checkpoint verify" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "llm_warden.proxy", "audit", "verify", "--db", str(db) + ".missing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_config_file_names_the_database(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "warden.toml"
    cfg.write_text(f'[audit]\npath = "{db.name}"\ncheckpoint_file = "{db.name}.cp"\n[plugins]\nenabled = []\n[auth]\nmode = "none"\n')
    assert main(["--config", str(cfg), "audit", "verify"]) == 0
    assert "1 external" in capsys.readouterr().out
