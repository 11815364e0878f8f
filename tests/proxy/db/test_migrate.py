"""Schema migrations on the real PostgreSQL: from an empty database, from the previous version, concurrently;
a replica refuses a schema version it does not know."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit import pg_chain
from llm_warden.proxy.audit.chain import seed_bytes, verifier_key
from llm_warden.proxy.audit.pg_verify import verify_pg
from llm_warden.proxy.audit.postgres import PostgresAuditLog
from llm_warden.proxy.audit.record import Projector
from llm_warden.proxy.config import AuditConfig, DatabaseConfig
from llm_warden.proxy.db.migrate import COMPONENTS, SchemaMismatch, check_schema, latest_version, migrate, migrations
from tests.proxy.audit.helpers import make_exchange

pytestmark = pytest.mark.timeout(60)
AUDIT = COMPONENTS["audit"]
ROOT = Path(__file__).resolve().parents[3]


async def _fetchval(dsn: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def _store(dsn: str, tmp_path: Path) -> PostgresAuditLog:
    key = tmp_path / "k"
    key.write_text(base64.b64encode(seed_bytes(Ed25519PrivateKey.generate())).decode())
    return PostgresAuditLog(AuditConfig(backend="postgres", signing_key_file=str(key), checkpoint_every=5), DatabaseConfig(pool_max=3), dsn=dsn)


def test_the_audit_migrations_are_numbered_without_gaps() -> None:
    found = migrations(AUDIT)
    assert [m.version for m in found] == list(range(1, len(found) + 1)) and latest_version(AUDIT) == len(found) >= 2


def test_a_gap_or_a_stray_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="without gaps"):
        migrations(tmp_path)
    (tmp_path / "0003_c.sql").unlink()
    (tmp_path / "2_b.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="NNNN_"):
        migrations(tmp_path)


async def test_from_an_empty_database(pg_schema: str, tmp_path: Path) -> None:
    assert await migrate(pg_schema, "audit", AUDIT) == latest_version(AUDIT)
    assert await _fetchval(pg_schema, "SELECT version FROM warden_schema WHERE component = 'audit'") == latest_version(AUDIT)
    assert await migrate(pg_schema, "audit", AUDIT) == latest_version(AUDIT)  # a second run does nothing
    log = _store(pg_schema, tmp_path)
    await log.start()
    await log.record_exchange(make_exchange(request_id="req_1"))
    await log.stop()
    assert (await verify_pg(pg_schema)).ok


async def test_from_the_previous_version_keeps_the_data(pg_schema: str, tmp_path: Path) -> None:
    previous = latest_version(AUDIT) - 1
    assert await migrate(pg_schema, "audit", AUDIT, target=previous) == previous
    # A replica of this version refuses the older schema, with the way out in the message.
    with pytest.raises(SchemaMismatch, match="run `warden db migrate`"):
        await _store(pg_schema, tmp_path).start()
    # A chain written on the previous version's tables (with the append path itself)...
    key = Ed25519PrivateKey.generate()
    pj = Projector("redacted", provider="openai")
    conn = await asyncpg.connect(pg_schema)
    try:
        head = await pg_chain.create_chain(conn, "warden-audit/old/0001", key, "test")
        batch = pg_chain.prepare_append(head, [pj.exchange(make_exchange(request_id=f"req_{i}")) for i in range(7)], key, every=5)
        await pg_chain.append(conn, head, batch, 10.0)
    finally:
        await conn.close()
    # ... survives the migration, and a replica of this version runs on it (and seals that chain, left open).
    assert await migrate(pg_schema, "audit", AUDIT) == latest_version(AUDIT)
    assert await _fetchval(pg_schema, "SELECT count(*) FROM audit_records") == 7
    assert await _fetchval(pg_schema, "SELECT to_regprocedure('audit_prune_mark(bigint, bigint)') IS NOT NULL")
    log = _store(pg_schema, tmp_path)
    await log.start()
    assert log.recovery["sealed_chains"] == ["warden-audit/old/0001"]
    await log.record_exchange(make_exchange(request_id="req_after"))
    await log.stop()
    report = await verify_pg(pg_schema, keys=[verifier_key("k", key.public_key()), verifier_key("k", log._key.public_key())])  # type: ignore[union-attr]
    assert report.ok and report.records == 8, report.render()


async def test_a_newer_schema_is_refused(pg_schema: str, tmp_path: Path) -> None:
    await migrate(pg_schema, "audit", AUDIT)
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute("UPDATE warden_schema SET version = 99 WHERE component = 'audit'")
        with pytest.raises(SchemaMismatch, match="newer"):
            await check_schema(conn, "audit", latest_version(AUDIT))
    finally:
        await conn.close()
    with pytest.raises(SchemaMismatch, match=f"version 99, newer than the {latest_version(AUDIT)} this Warden knows"):
        await _store(pg_schema, tmp_path).start()
    with pytest.raises(SchemaMismatch, match="newer than this Warden's"):
        await migrate(pg_schema, "audit", AUDIT)


async def test_no_schema_is_refused_at_start(pg_schema: str, tmp_path: Path) -> None:
    with pytest.raises(SchemaMismatch, match="no audit schema: run `warden db migrate` first"):
        await _store(pg_schema, tmp_path).start()


async def test_replicas_migrating_at_once_apply_each_file_once(pg_schema: str) -> None:
    results = await asyncio.gather(*(migrate(pg_schema, "audit", AUDIT) for _ in range(4)))
    assert results == [latest_version(AUDIT)] * 4
    assert await _fetchval(
        pg_schema, "SELECT count(*) FROM pg_proc WHERE proname = 'audit_prune_mark' AND pronamespace = current_schema()::regnamespace"
    ) == 1


async def test_components_keep_their_own_versions(pg_schema: str, tmp_path: Path) -> None:
    (tmp_path / "0001_things.sql").write_text("CREATE TABLE other_things (id int PRIMARY KEY);")
    assert await migrate(pg_schema, "other", tmp_path) == 1
    assert await migrate(pg_schema, "audit", AUDIT) == latest_version(AUDIT)
    conn = await asyncpg.connect(pg_schema)
    try:
        rows = {r["component"]: r["version"] for r in await conn.fetch("SELECT component, version FROM warden_schema")}
        await check_schema(conn, "other", 1)
    finally:
        await conn.close()
    assert rows == {"other": 1, "audit": latest_version(AUDIT)}


async def test_a_failed_migration_leaves_the_previous_version(pg_schema: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE t1 (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE t2 (id int); SELECT no_such_function();")
    with pytest.raises(asyncpg.exceptions.UndefinedFunctionError):
        await migrate(pg_schema, "x", tmp_path)
    assert await _fetchval(pg_schema, "SELECT version FROM warden_schema WHERE component = 'x'") == 1
    assert await _fetchval(pg_schema, "SELECT to_regclass('t2') IS NULL")


def test_warden_db_migrate_command(pg_schema: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WARDEN_DATABASE_URL": pg_schema}
    run = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", "db", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"audit: schema version 0 -> {latest_version(AUDIT)}" in run.stdout
    again = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", "db", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "(up to date)" in again.stdout
    env.pop("WARDEN_DATABASE_URL")
    missing = subprocess.run([sys.executable, "-m", "llm_warden.proxy.cli", "db", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "WARDEN_DATABASE_URL is not set" in missing.stderr
