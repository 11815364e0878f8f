"""The explorer's search on both stores: keyset pages cover every record once, newest first; filters by request id and status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_warden.proxy.audit.base import ReaderQueries
from llm_warden.proxy.audit.sqlite import SQLiteAuditLog
from llm_warden.proxy.config import AuditConfig
from tests.proxy.audit.helpers import make_exchange


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, make_pg_log: Any) -> Any:
    if request.param == "postgres":
        yield await make_pg_log(durability="sync")
        return
    log = SQLiteAuditLog(AuditConfig(durability="sync"), tmp_path / "audit.db", upstream_key=None, provider="openai")  # type: ignore[arg-type]
    await log.start()
    yield log
    await log.stop()


async def _fill(store: ReaderQueries, n: int) -> list[str]:
    rids = []
    for i in range(n):
        ex = make_exchange(request_id=f"req_page_{i:03d}", tenant="acme" if i % 2 else "globex")
        ex.status = 502 if i % 5 == 0 else 200
        await store.record_exchange(ex)  # type: ignore[attr-defined]
        rids.append(ex.request_id)
    return rids


async def test_keyset_pages_cover_every_record_once_newest_first(store: Any) -> None:
    rids = await _fill(store, 23)
    seen: list[str] = []
    before = None
    while True:
        page = await store.search(limit=5, kind="exchange", before=before)
        seen += [r["request_id"] for r in page]
        if len(page) < 5:
            break
        before = page[-1]["_cursor"]
    assert seen == list(reversed(rids))


async def test_filters_by_request_id_status_and_tenant(store: Any) -> None:
    rids = await _fill(store, 10)
    (hit,) = await store.search(request_id=rids[3])
    assert hit["request_id"] == rids[3]
    bad = await store.search(status=502, kind="exchange")
    assert [r["request_id"] for r in bad] == [rids[5], rids[0]]
    acme = await store.search(tenant="acme", status=200, limit=2)
    assert [r["request_id"] for r in acme] == [rids[9], rids[7]]
    rest = await store.search(tenant="acme", status=200, limit=10, before=acme[-1]["_cursor"])
    assert [r["request_id"] for r in rest] == [rids[3], rids[1]]


@pytest.mark.parametrize(
    "cursor",
    [
        "1 OR 1=1",
        "x",
        "1.2",
        "-5",
        "9" * 30,
        "1.2.3.4",
        "1..2",
        "",
        "9" * 19,
        "9" * 19 + ".1.1",
        "1.9223372036854775808.1",
        "\u00b2",
        "1.1.\u00b2",
        "\u0661",
    ],
)
async def test_a_forged_cursor_is_refused(store: Any, cursor: str) -> None:
    await _fill(store, 2)
    if cursor == "":
        assert len(await store.search(before=None)) == 2
        return
    with pytest.raises(ValueError):
        await store.search(before=cursor)


async def test_chain_findings_of_a_recorded_exchange_are_all_good(store: Any) -> None:
    from llm_warden.proxy.console.chain_status import chain_findings

    rids = await _fill(store, 3)
    if hasattr(store, "checkpoint"):
        await store.checkpoint("test")
    rec = await store.find(rids[1])
    proof = await store.chain_proof(rec["_seq"], rec.get("_origin"))
    assert proof is not None and proof.seq == rec["_seq"]
    kinds = [k for k, _ in chain_findings(proof)]
    assert kinds == ["ok", "ok", "ok"], chain_findings(proof)
    assert "covers this record" in chain_findings(proof)[2][1]
    assert await store.chain_proof(10_000, rec.get("_origin")) is None


async def test_an_altered_record_is_shown_as_altered(tmp_path: Path) -> None:
    import sqlite3

    from llm_warden.proxy.console.chain_status import chain_findings

    log = SQLiteAuditLog(AuditConfig(durability="sync"), tmp_path / "audit.db", upstream_key=None, provider="openai")  # type: ignore[arg-type]
    await log.start()
    try:
        rids = await _fill(log, 3)
        rec = await log.find(rids[1])
        conn = sqlite3.connect(tmp_path / "audit.db")
        conn.execute("DROP TRIGGER records_no_update")
        conn.execute("UPDATE records SET body = CAST(REPLACE(CAST(body AS TEXT), 'acme', 'acm3') AS BLOB) WHERE seq = ?", (rec["_seq"],))
        conn.execute("UPDATE records SET prev_hash = zeroblob(32) WHERE seq = ?", (rec["_seq"] + 1,))
        conn.commit()
        conn.close()
        findings = chain_findings(await log.chain_proof(rec["_seq"]))  # type: ignore[arg-type]
        assert findings[0][0] == "error" and "altered" in findings[0][1]
        findings = chain_findings(await log.chain_proof(rec["_seq"] + 1))  # type: ignore[arg-type]
        assert findings[1][0] == "error" and "does not link" in findings[1][1]
    finally:
        await log.stop()


async def test_the_console_on_a_postgresql_audit_log(
    warden_factory: Any, tmp_path: Path, pg_dsn: str, key_file: Path, monkeypatch: pytest.MonkeyPatch, fake: Any, token: Any
) -> None:
    import re

    from tests.proxy.console.conftest import TOOLS, Browser, hold_refund

    monkeypatch.setenv("WARDEN_TEST_AUDIT_DSN", pg_dsn)
    rw = await warden_factory(
        {
            "plugins": {"enabled": ["tools", "headers"]},
            "policy": {"state_db": str(tmp_path / "state.db"), "read_only": False, "mode_refresh_s": 0},
            "tools": TOOLS,
            "audit": {"enabled": True, "backend": "postgres", "durability": "sync", "signing_key_file": str(key_file)},
            "database": {"dsn_env": "WARDEN_TEST_AUDIT_DSN", "pool_max": 4},
        }
    )
    rids = [await hold_refund(rw, fake, token(groups=["billing"]), f'{{"invoice_id": "inv_{i}", "amount": 500}}') for i in range(3)]
    b = Browser(rw)
    try:
        await b.sign_in()
        _, text, _ = await b.get(f"/console/audit?request_id={rids[1]}")
        assert rids[1] in text and rids[0] not in text
        import llm_warden.proxy.console.audit_views as av

        monkeypatch.setattr(av, "PAGE", 2)
        _, text, _ = await b.get("/console/audit?kind=exchange")
        assert rids[2] in text and rids[1] in text and rids[0] not in text
        nxt = re.search(r'href="(/console/audit\?[^"]+)" rel="next"', text).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
        _, text, _ = await b.get(nxt)
        assert rids[0] in text and rids[1] not in text
        status, text, _ = await b.get(f"/console/audit/exchange/{rids[0]}")
        assert status == 200 and "matches its hash" in text and "links to the record before it" in text and "please refund inv_1" in text
        _, text, _ = await b.get("/console/approvals")
        assert text.count("data-approval=") == 3
    finally:
        await b.close()
