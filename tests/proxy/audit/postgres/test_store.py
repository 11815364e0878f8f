"""The PostgreSQL audit store against a real server: durability modes, backpressure, crashes, replicas."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from llm_warden.proxy.audit.pg_verify import verify_pg
from llm_warden.proxy.errors import AuditUnavailable
from tests.proxy.audit.helpers import make_exchange
from tests.proxy.audit.postgres.conftest import PgLogFactory

pytestmark = pytest.mark.timeout(60)


async def _count(dsn: str, sql: str = "SELECT count(*) FROM audit_records", *args: object) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def test_sync_record_is_committed_before_return(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(durability="sync", store_content="full")
    ex = make_exchange(request_id="req_sync_1", user_text="my key is sk-proj-abcdefghijklmnopqrstuvwxyz0123456789")
    await log.record_exchange(ex)
    # Committed: another connection sees it at once.
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT seq, kind, request_id, tenant, subject, body FROM audit_records WHERE request_id = 'req_sync_1'")
    finally:
        await conn.close()
    assert row is not None and row["seq"] == 1 and row["kind"] == "exchange" and row["tenant"] == "acme"
    body = bytes(row["body"])
    assert b"sk-proj-abcdefghij" not in body and b"[REDACTED:provider_key]" in body
    assert b"secret-token-value" not in body  # the authorization header is never recorded
    rec = await log.find("req_sync_1")
    assert rec is not None and rec["_seq"] == 1 and rec["_origin"] == log.origin
    assert await log.find("req_sync_1", tenant="other") is None


async def _ids(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [str(r[0]) for r in await conn.fetch("SELECT request_id FROM audit_records WHERE kind = 'exchange' ORDER BY chain_id, seq")]
    finally:
        await conn.close()


async def test_batch_mode_groups_records_and_stop_flushes(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(durability="batch", batch_max_records=64, checkpoint_every=100)
    groups: list[int] = []
    log.on_commit = lambda _s, n: groups.append(n)
    n = 600

    async def writer(k: int) -> None:
        for i in range(k, n, 8):
            await log.record_exchange(make_exchange(request_id=f"req_b_{i:04d}"))
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(k) for k in range(8)))
    await log.stop()
    ids = await _ids(pg_dsn)
    assert sorted(ids) == [f"req_b_{i:04d}" for i in range(n)]
    assert sum(groups) == n and max(groups) <= 64 and len(groups) < n / 4, groups  # group commit, bounded groups
    assert log.records_written == n and log.queue_depth == 0
    report = await verify_pg(pg_dsn)
    assert report.ok, report.render()
    # A checkpoint every 100 records (the last at 600 also seals the tail: no unsealed-tail warning); the chain is closed.
    assert [r.checkpoints for r in report.chains] == [6]
    assert not [f for r in report.chains for f in r.findings if f.severity == "warning"]
    assert await _count(pg_dsn, "SELECT count(*) FROM audit_chains WHERE closed_us IS NOT NULL") == 1


async def _hold_chain_row(dsn: str, chain_id: int) -> asyncpg.Connection:
    """Another session locks the chain's row: the writer's next UPDATE waits (a database that stalls)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM audit_chains WHERE chain_id = $1 FOR UPDATE", chain_id)
    return conn


async def test_batch_backpressure_waits_and_never_drops(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(durability="batch", queue_max=8, batch_max_records=4, batch_max_ms=0)
    assert log.chain_id is not None
    blocker = await _hold_chain_row(pg_dsn, log.chain_id)
    n = 40
    done: list[int] = []

    async def one(i: int) -> None:
        await log.record_exchange(make_exchange(request_id=f"req_bp_{i:03d}"))
        done.append(i)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.5)
    # The writer is stuck on the lock: 4 records in its statement, 8 queued; everyone else waits (backpressure).
    assert len(done) == 12 and log.queue_depth == 12, (len(done), log.queue_depth)
    assert log.healthy
    await blocker.execute("ROLLBACK")
    await blocker.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    await log.stop()
    assert sorted(await _ids(pg_dsn)) == [f"req_bp_{i:03d}" for i in range(n)]


async def _break_records(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE audit_records RENAME TO audit_records_away")
    finally:
        await conn.close()


async def _mend_records(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE audit_records_away RENAME TO audit_records")
    finally:
        await conn.close()


async def test_sync_fails_closed_when_the_record_cannot_be_written(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(durability="sync")
    await log.record_exchange(make_exchange(request_id="req_ok_1"))
    await _break_records(pg_dsn)
    with pytest.raises(AuditUnavailable) as err:
        await log.record_exchange(make_exchange(request_id="req_lost"))
    assert err.value.status == 503 and err.value.rule == "audit.durability"
    assert not log.healthy and log.failures >= 1
    with pytest.raises(AuditUnavailable):
        await log.record_event("tools.mode", {"subject": "admin"}, {"mode": "enforce"})
    await _mend_records(pg_dsn)
    await log.record_exchange(make_exchange(request_id="req_ok_2"))
    assert log.healthy
    await log.stop()
    assert await _ids(pg_dsn) == ["req_ok_1", "req_ok_2"]
    report = await verify_pg(pg_dsn)
    assert report.ok, report.render()


async def test_batch_retries_while_down_and_refuses_once_the_queue_is_full(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(durability="batch", queue_max=6, batch_max_records=3, batch_max_ms=0)
    await _break_records(pg_dsn)
    accepted: list[int] = []
    refused = 0
    for i in range(30):
        try:
            await asyncio.wait_for(log.record_exchange(make_exchange(request_id=f"req_r_{i:02d}")), 1.0)
            accepted.append(i)
        except AuditUnavailable:
            refused += 1
    assert not log.healthy and refused > 0, (accepted, refused)
    assert log.queue_depth == len(accepted)  # every accepted record is still held, none dropped
    await _mend_records(pg_dsn)
    for _ in range(200):
        if log.queue_depth == 0 and log.healthy:
            break
        await asyncio.sleep(0.05)
    await log.stop()
    assert sorted(await _ids(pg_dsn)) == sorted(f"req_r_{i:02d}" for i in accepted)
