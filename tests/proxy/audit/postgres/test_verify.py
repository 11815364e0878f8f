"""Replicas append at once; verify checks every chain and names the first bad record of a tampered one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import load_private_key, verifier_key
from llm_warden.proxy.audit.pg_reader import PgAuditReader
from llm_warden.proxy.audit.pg_verify import StoreReport, verify_pg
from llm_warden.proxy.audit.postgres import PostgresAuditLog
from tests.proxy.audit.helpers import make_exchange
from tests.proxy.audit.postgres.conftest import PgLogFactory

pytestmark = pytest.mark.timeout(90)


async def _two_replicas(make_pg_log: PgLogFactory, n: int = 120, **cfg: object) -> tuple[PostgresAuditLog, PostgresAuditLog]:
    """Two stores (two replicas) appending concurrently, sync, 8 writers each; both stopped."""
    a = await make_pg_log(durability="sync", checkpoint_every=25, **cfg)
    b = await make_pg_log(durability="sync", checkpoint_every=25, **cfg)

    async def writer(log: PostgresAuditLog, name: str, k: int) -> None:
        for i in range(k, n, 8):
            await log.record_exchange(make_exchange(request_id=f"req_{name}_{i:04d}", tenant=f"t{i % 3}"))

    await asyncio.gather(*(writer(log, name, k) for log, name in ((a, "a"), (b, "b")) for k in range(8)))
    await a.record_event("tools.mode", {"subject": "admin", "tenant": "t0"}, {"mode": "enforce"})
    await a.stop()
    await b.stop()
    return a, b


async def _tamper(dsn: str, *sql: str, args: tuple[object, ...] = ()) -> None:
    """As a superuser, with the append-only triggers off for this session (what an attacker with the database would do)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        for s in sql:
            await conn.execute(s, *(args if "$" in s else ()))
    finally:
        await conn.close()


def _first(report: StoreReport) -> tuple[str, str, int | None]:
    first = report.first_fault()
    assert first is not None, report.render()
    return first[0], first[1].kind, first[1].seq


async def test_two_replicas_append_concurrently_and_verify(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    a, b = await _two_replicas(make_pg_log)
    assert a.origin != b.origin and a.chain_id != b.chain_id
    report = await verify_pg(pg_dsn)
    assert report.ok, report.render()
    assert report.records == 241 and {r.origin: r.records for r in report.chains} == {a.origin: 121, b.origin: 120}
    for r in report.chains:
        assert (r.first_seq, r.last_seq) == (1, r.records)
        assert not [f for f in r.findings if f.severity == "warning"], report.render()  # sealed at stop
    assert "OK: every chain" in report.render()
    # Both replicas' records are found by one search, newest first.
    reader = await PgAuditReader.open(pg_dsn)
    try:
        rows = await reader.search(tenant="t0")
    finally:
        await reader.close()
    assert {r["_origin"] for r in rows} == {a.origin, b.origin}
    assert [r["ts_us"] for r in rows] == sorted((r["ts_us"] for r in rows), reverse=True)


async def test_edited_row_is_caught_at_its_record(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    _a, b = await _two_replicas(make_pg_log)
    await _tamper(
        pg_dsn,
        "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), '\"status\":200', '\"status\":201'), 'UTF8') "
        "WHERE chain_id = $1 AND seq = 7",
        args=(b.chain_id,),
    )
    report = await verify_pg(pg_dsn)
    assert not report.ok
    assert _first(report) == (b.origin, "edited", 7)
    assert "FAIL: first fault: edited at seq 7 in chain " + b.origin in report.render()
    assert report.to_dict()["first_fault"]["origin"] == b.origin
    assert next(r for r in report.chains if r.origin != b.origin).ok  # the other replica's chain is intact


async def test_deleted_row_is_caught(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    a, _b = await _two_replicas(make_pg_log)
    await _tamper(pg_dsn, "DELETE FROM audit_records WHERE chain_id = $1 AND seq = 12", args=(a.chain_id,))
    report = await verify_pg(pg_dsn)
    assert _first(report) == (a.origin, "deleted", 13)


async def test_reordered_pair_is_caught(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    _a, b = await _two_replicas(make_pg_log)
    await _tamper(
        pg_dsn,
        "UPDATE audit_records SET seq = -1 WHERE chain_id = $1 AND seq = 15",
        "UPDATE audit_records SET seq = 15 WHERE chain_id = $1 AND seq = 16",
        "UPDATE audit_records SET seq = 16 WHERE chain_id = $1 AND seq = -1",
        args=(b.chain_id,),
    )
    report = await verify_pg(pg_dsn)
    assert _first(report) == (b.origin, "reordered", 15)


async def test_cut_tail_and_rewound_head_are_caught(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    a, _b = await _two_replicas(make_pg_log)
    # The last records deleted and the head moved back to match: the checkpoints still cover them.
    await _tamper(
        pg_dsn,
        "DELETE FROM audit_records WHERE chain_id = $1 AND seq > 110",
        "UPDATE audit_chains SET seq = 110, hash = (SELECT hash FROM audit_records WHERE chain_id = $1 AND seq = 110) WHERE chain_id = $1",
        args=(a.chain_id,),
    )
    report = await verify_pg(pg_dsn)
    assert _first(report) == (a.origin, "truncated", 111)


async def test_whole_chain_deleted_is_caught_by_the_external_checkpoints(make_pg_log: PgLogFactory, pg_dsn: str, tmp_path: Path) -> None:
    notes = tmp_path / "checkpoints.txt"
    a, _b = await _two_replicas(make_pg_log, checkpoint_file=str(notes))
    assert (await verify_pg(pg_dsn, checkpoint_file=notes)).ok
    await _tamper(
        pg_dsn,
        "DELETE FROM audit_records WHERE chain_id = $1",
        "DELETE FROM audit_checkpoints WHERE chain_id = $1",
        "DELETE FROM audit_chains WHERE chain_id = $1",
        args=(a.chain_id,),
    )
    report = await verify_pg(pg_dsn, checkpoint_file=notes)
    assert _first(report)[1] == "deleted_chain" and a.origin in report.render()
    # Records left behind without their chain row are faults too.
    b_id = _b.chain_id
    await _tamper(pg_dsn, "DELETE FROM audit_chains WHERE chain_id = $1", args=(b_id,))
    report = await verify_pg(pg_dsn)
    assert [f.kind for f in report.store.faults] == ["orphan_records", "orphan_records"], report.render()


async def test_independent_key_trusts_the_fleet_key_and_refuses_another(make_pg_log: PgLogFactory, pg_dsn: str, key_file: Path) -> None:
    await _two_replicas(make_pg_log, n=30)
    fleet = load_private_key(await asyncio.to_thread(key_file.read_text)).public_key()
    ok = await verify_pg(pg_dsn, keys=[verifier_key("any-name", fleet)])
    assert ok.ok and not ok.store.findings, ok.render()  # no "trusting the stored keys" note
    other = verifier_key("x", Ed25519PrivateKey.generate().public_key())
    bad = await verify_pg(pg_dsn, keys=[other])
    assert not bad.ok and _first(bad)[1] == "forged_checkpoint"
    with pytest.raises(ValueError):
        await verify_pg(pg_dsn, keys=["not a key"])


async def test_a_running_replicas_chain_is_reported_live_not_unclean(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(durability="sync", checkpoint_every=1000)
    for i in range(3):
        await log.record_exchange(make_exchange(request_id=f"req_live_{i}"))
    report = await verify_pg(pg_dsn)  # its writer holds the chain's advisory lock
    assert report.ok, report.render()
    (chain,) = [r for r in report.chains if r.origin == log.origin]
    assert chain.live and [f.kind for f in chain.findings if f.severity != "info"] == [], report.render()
    assert "live" in [f.kind for f in chain.findings]
    await log.stop()
    report = await verify_pg(pg_dsn)
    (chain,) = [r for r in report.chains if r.origin == log.origin]
    assert not chain.live and "live" not in [f.kind for f in chain.findings], report.render()
