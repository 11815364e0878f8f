"""``warden audit show|search|export|verify|replay`` against the PostgreSQL store, chosen by ``[audit] backend``."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from llm_warden.proxy.audit.chain import genesis_hash, leaf_hash, load_private_key, verifier_key
from llm_warden.proxy.cli import main
from llm_warden.proxy.exchange import Decision, ToolCall, ToolDecisionRecord
from tests.proxy.audit.helpers import make_exchange
from tests.proxy.audit.postgres.conftest import PgLogFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def store(make_pg_log: PgLogFactory, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two replicas' records in the store; returns a config file that selects it (URL in WARDEN_TEST_AUDIT_DSN)."""
    a = await make_pg_log(checkpoint_every=4, store_content="full")
    b = await make_pg_log(checkpoint_every=4, store_content="full")
    first = make_exchange(request_id="req_a", tenant="acme", subject="alice")
    first.tool_decisions = [ToolDecisionRecord(0, ToolCall("call_77", "lookup_order", '{"id": 7}'), Decision.allow("tools.lookup_order"))]
    await a.record_exchange(first)
    second = make_exchange(request_id="req_b", tenant="acme", subject="bob", tool="refund")
    second.tool_decisions[0].decision = Decision.deny("tools.refund.policy", "refunds need approval")
    second.tool_results = [{"tool_call_id": "call_77", "content": '{"status": "shipped"}'}]
    await b.record_exchange(second)
    await a.record_exchange(make_exchange(request_id="req_c", tenant="globex", subject="carol"))
    await b.record_event("feedback", {"tenant": "acme", "subject": "rev"}, {"request_id": "req_b", "rating": -1, "comment": "wrong", "correction": None})
    await a.stop()
    await b.stop()
    monkeypatch.setenv("WARDEN_TEST_AUDIT_DSN", pg_dsn)
    cfg = tmp_path / "warden.toml"
    cfg.write_text('[audit]\nbackend = "postgres"\n\n[database]\ndsn_env = "WARDEN_TEST_AUDIT_DSN"\n\n[auth]\nmode = "none"\n')
    return cfg


def test_show_finds_an_exchange_of_either_replica(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(store), "audit", "show", "req_b"]) == 0
    out = capsys.readouterr().out
    assert "exchange req_b" in out and "tenant=acme subject=bob" in out
    assert "deny [rule tools.refund.policy] refunds need approval" in out
    assert "tool result  call_77 (call made in req_a)" in out  # the call was made on the other replica
    assert "feedback" in out and "wrong" in out
    assert main(["--config", str(store), "audit", "show", "req_nope"]) == 2
    assert "no exchange 'req_nope'" in capsys.readouterr().err


def test_search_is_newest_first_across_replicas(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(store), "audit", "search", "--tenant", "acme", "--json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("request_id") or r["data"]["request_id"] for r in rows] == ["req_b", "req_b", "req_a"]
    assert len({r["_origin"] for r in rows}) == 2
    assert main(["--config", str(store), "audit", "search", "--tool", "refund", "--json"]) == 0
    assert [orjson.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["req_b"]


def test_export_lines_recompute_every_hash(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export.jsonl"
    assert main(["--config", str(store), "audit", "export", "-o", str(out)]) == 0
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and len({x["origin"] for x in lines}) == 2
    prev: dict[str, bytes] = {}
    for x in lines:
        p = prev.get(x["origin"], genesis_hash(x["origin"]))
        assert bytes.fromhex(x["prev_hash"]) == p
        h = leaf_hash(p, x["seq"], orjson.dumps(x["record"], option=orjson.OPT_SORT_KEYS))
        assert h.hex() == x["hash"]
        prev[x["origin"]] = h


def test_verify_passes_and_takes_the_fleet_key(store: Path, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(store), "audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "2 chains, 4 records" in out and "OK: every chain and every checkpoint verify" in out
    fleet = verifier_key("fleet", load_private_key(key_file.read_text()).public_key())
    assert main(["--config", str(store), "audit", "verify", "--key", fleet, "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["ok"] is True


def test_db_url_on_the_command_line_and_unreachable_database(store: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "search", "--db", pg_dsn, "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert main(["audit", "search", "--db", "postgresql://nobody:secret-pw@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the audit database postgresql://nobody@127.0.0.1:1/none" in err and "secret-pw" not in err
    assert main(["audit", "verify", "--db", "postgresql://nobody:secret-pw@127.0.0.1:1/none"]) == 2
    assert "secret-pw" not in capsys.readouterr().err


def test_missing_dsn_variable_is_a_config_error(store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WARDEN_TEST_AUDIT_DSN")
    assert main(["--config", str(store), "audit", "search"]) == 2
    assert "WARDEN_TEST_AUDIT_DSN is not set" in capsys.readouterr().err
