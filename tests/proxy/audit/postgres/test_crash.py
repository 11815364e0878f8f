"""Crashes: the writer's connection cut mid-batch, a replica SIGKILLed mid-write; no acknowledged record is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from llm_warden.proxy.audit.pg_verify import verify_pg
from llm_warden.proxy.errors import AuditUnavailable
from tests.proxy.audit.helpers import make_exchange
from tests.proxy.audit.postgres.conftest import PgLogFactory

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[4]


async def _writer_pid(dsn: str, origin: str) -> int:
    """The backend pid of the store's writer connection: the one holding its chain's advisory lock."""
    from llm_warden.proxy.audit.pg_chain import lock_key

    key = lock_key(origin)
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            pid = await conn.fetchval(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND ((classid::bigint << 32) | objid::bigint) = ($1::bigint & x'ffffffffffffffff'::bigint)",
                key,
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError("no backend holds the chain's lock")


async def _terminate(dsn: str, pid: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def _request_ids(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [str(r[0]) for r in await conn.fetch("SELECT request_id FROM audit_records WHERE kind = 'exchange'")]
    finally:
        await conn.close()


@pytest.mark.parametrize("durability", ["batch", "sync"])
async def test_writer_connection_killed_mid_batch(make_pg_log: PgLogFactory, pg_dsn: str, durability: str) -> None:
    """pg_terminate_backend on the writer while groups flow: the store reconnects; what it acknowledged is
    there exactly once (sync: a request may get 503, never a lost or doubled record)."""
    log = await make_pg_log(durability=durability, batch_max_records=32, checkpoint_every=64)
    acked: list[str] = []
    refused: list[str] = []
    sent: list[str] = []
    killed = asyncio.Event()

    async def writer(k: int) -> None:
        i = 0
        while not killed.is_set():
            rid = f"req_k{k:02d}_{i:05d}"
            i += 1
            sent.append(rid)
            try:
                await log.record_exchange(make_exchange(request_id=rid))
            except AuditUnavailable:
                refused.append(rid)
            else:
                acked.append(rid)
            await asyncio.sleep(0.001)

    async def killer() -> None:
        try:
            for _ in range(3):
                await asyncio.sleep(0.2)
                await _terminate(pg_dsn, await _writer_pid(pg_dsn, log.origin))
            await asyncio.sleep(0.2)
        finally:
            killed.set()

    await asyncio.gather(killer(), *(writer(k) for k in range(16)))
    await log.stop()
    ids = await _request_ids(pg_dsn)
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert set(acked) <= set(ids), f"acknowledged but lost: {sorted(set(acked) - set(ids))[:5]}"
    if durability == "batch":
        assert not refused and sorted(ids) == sorted(sent)
    assert log.writer_restarts >= 1
    report = await verify_pg(pg_dsn)
    assert report.ok, report.render()


async def test_replica_killed_mid_write_loses_no_acknowledged_record(make_pg_log: PgLogFactory, pg_dsn: str, key_file: Path) -> None:
    """SIGKILL a process writing in sync mode: every id it printed as acknowledged is in the database; the next
    replica to start seals the dead chain, and the store verifies."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.proxy.audit.postgres.crash_child", pg_dsn, str(key_file), cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    origin = (await proc.stdout.readline()).decode().split()[1]
    lines: list[str] = []
    while len(lines) < 300:
        line = (await proc.stdout.readline()).decode()
        assert line, "the child ended early"
        lines.append(line)
    proc.send_signal(signal.SIGKILL)
    lines += (await proc.stdout.read()).decode().splitlines()
    await proc.wait()
    acked = {ln.split()[1] for ln in lines if ln.startswith("ack ")}
    ids = await _request_ids(pg_dsn)
    assert acked <= set(ids), f"acknowledged but lost: {sorted(acked - set(ids))[:5]}"
    assert len(ids) == len(set(ids))

    before = await verify_pg(pg_dsn)
    assert before.ok, before.render()  # an unsealed tail is a warning, not a fault
    # A new replica starts: the dead process's chain (its lock went with its connection) is sealed and closed.
    for _ in range(100):
        log = await make_pg_log(durability="sync")
        if origin in log.recovery.get("sealed_chains", []):
            break
        await log.stop()  # the dead backend had not let go of the lock yet
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the dead chain was never sealed")
    await log.record_exchange(make_exchange(request_id="req_after"))
    await log.stop()
    after = await verify_pg(pg_dsn)
    assert after.ok, after.render()
    dead = next(r for r in after.chains if r.origin == origin)
    assert not [f for f in dead.findings if f.kind == "torn_tail"], after.render()
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM audit_chains WHERE closed_us IS NULL") == 0
        reason = await conn.fetchval(
            "SELECT reason FROM audit_checkpoints k JOIN audit_chains c USING (chain_id) WHERE c.origin = $1 ORDER BY size DESC LIMIT 1", origin
        )
    finally:
        await conn.close()
    assert reason in ("recovery", "periodic")


async def test_commit_in_doubt_is_settled_by_the_head_never_written_twice(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    """The writer's connection is cut and no new one can be opened for a while, so whether the group in flight
    committed cannot be read: its records wait (neither retried nor counted) until the head says."""
    log = await make_pg_log(durability="batch", batch_max_records=16, batch_max_ms=0)
    real = log._conninfo
    sent: list[str] = []
    stop = asyncio.Event()

    async def writer(k: int) -> None:
        i = 0
        while not stop.is_set():
            rid = f"req_d{k}_{i:05d}"
            i += 1
            sent.append(rid)
            await log.record_exchange(make_exchange(request_id=rid))
            await asyncio.sleep(0.001)

    async def outage() -> None:
        # Whether a group is in flight at the cut is a race: cut again (up to 8 times) until one was.
        doubt = False
        try:
            for _ in range(8):
                await asyncio.sleep(0.2)
                pid = await _writer_pid(pg_dsn, log.origin)
                log._conninfo = "postgresql://postgres@127.0.0.1:1/none"  # nothing listens: every reconnect fails
                await _terminate(pg_dsn, pid)
                for _ in range(200):
                    if not log.healthy:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                doubt = log._limbo is not None
                log._conninfo = real
                for _ in range(400):
                    if log.healthy and log._limbo is None:
                        break
                    await asyncio.sleep(0.02)
                if doubt:
                    break
            await asyncio.sleep(0.2)
        finally:
            log._conninfo = real
            stop.set()
        assert doubt, "no cut ever found a group in flight"

    await asyncio.gather(outage(), *(writer(k) for k in range(4)))
    await log.stop()
    ids = await _request_ids(pg_dsn)
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert sorted(ids) == sorted(sent)
    report = await verify_pg(pg_dsn)
    assert report.ok, report.render()
