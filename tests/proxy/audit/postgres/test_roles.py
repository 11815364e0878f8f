"""Append-only in the database: the triggers refuse edits to everybody, and the documented role setup
leaves the role Warden writes with INSERT and SELECT only (its UPDATE/DELETE fail); retention still works."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from llm_warden.proxy.audit.pg_verify import verify_pg
from llm_warden.proxy.audit.postgres import PostgresAuditLog
from llm_warden.proxy.config import AuditConfig, DatabaseConfig
from llm_warden.proxy.db.migrate import COMPONENTS, latest_version, migrate
from llm_warden.proxy.errors import AuditUnavailable
from tests.pg_helpers import BASE_DSN, schema_dsn
from tests.proxy.audit.helpers import make_exchange
from tests.proxy.audit.postgres.conftest import PgLogFactory

pytestmark = pytest.mark.timeout(90)
DOC = Path(__file__).resolve().parents[4] / "docs" / "audit.md"


def _doc_sql(first_line: str) -> str:
    """The fenced SQL block of docs/audit.md that starts with ``first_line``."""
    for block in re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"docs/audit.md has no SQL block starting {first_line!r}")


async def _refused(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as err:
        await conn.execute(sql, *args)
    return str(err.value)


async def test_triggers_refuse_update_and_delete_even_for_the_owner(make_pg_log: PgLogFactory, pg_dsn: str) -> None:
    log = await make_pg_log(checkpoint_every=5)
    for i in range(12):
        await log.record_exchange(make_exchange(request_id=f"req_t_{i}"))
    conn = await asyncpg.connect(pg_dsn)  # a superuser: every privilege, only the triggers stand in the way
    try:
        assert "append-only" in await _refused(conn, "UPDATE audit_records SET status = 500 WHERE seq = 3")
        assert "append-only" in await _refused(conn, "DELETE FROM audit_records WHERE seq = 12")
        assert "append-only" in await _refused(conn, "TRUNCATE audit_records")
        assert "append-only" in await _refused(conn, "UPDATE audit_checkpoints SET note = 'x'")
        assert "append-only" in await _refused(conn, "DELETE FROM audit_checkpoints")
        assert "append-only" in await _refused(conn, "DELETE FROM audit_keys")
        assert "append-only" in await _refused(conn, "DELETE FROM audit_chains")
        assert "forward" in await _refused(conn, "UPDATE audit_chains SET seq = 3")
        assert "forward" in await _refused(conn, "UPDATE audit_chains SET origin = 'other'")
        assert "forward" in await _refused(conn, "UPDATE audit_chains SET pruned_through = 50")  # beyond the head
        assert await conn.fetchval("SELECT count(*) FROM audit_records") == 12
    finally:
        await conn.close()
    await log.stop()
    assert (await verify_pg(pg_dsn)).ok


@pytest.fixture
async def roles(pg_admin: asyncpg.Connection) -> AsyncIterator[tuple[str, str, str]]:
    """The documented roles and schema under unique names: ``(owner DSN, writer DSN, schema)``."""
    tag = secrets.token_hex(4)
    owner, writer, schema = f"wo_{tag}", f"ww_{tag}", f"wr_{tag}"

    def names(sql: str) -> str:
        return re.sub(r"\bwarden\.", f"{schema}.", sql.replace("warden_owner", owner).replace("warden_writer", writer)).replace(
            "SCHEMA warden ", f"SCHEMA {schema} "
        )

    await pg_admin.execute(names(_doc_sql("-- 1. roles and schema")))
    host = BASE_DSN.split("@", 1)[1]
    owner_dsn = schema_dsn(schema, f"postgresql://{owner}@{host}")
    writer_dsn = schema_dsn(schema, f"postgresql://{writer}@{host}")
    try:
        assert await migrate(owner_dsn, "audit", COMPONENTS["audit"]) == latest_version(COMPONENTS["audit"])
        conn = await asyncpg.connect(owner_dsn)
        try:
            await conn.execute(names(_doc_sql("-- 2. grants")))
        finally:
            await conn.close()
        yield owner_dsn, writer_dsn, schema
    finally:
        await pg_admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pg_admin.execute(f"DROP OWNED BY {owner}, {writer}")
        await pg_admin.execute(f"DROP ROLE {writer}")
        await pg_admin.execute(f"DROP ROLE {owner}")


async def test_writer_role_appends_and_reads_but_cannot_update_or_delete(roles: tuple[str, str, str], key_file: Path) -> None:
    owner_dsn, writer_dsn, _schema = roles
    log = PostgresAuditLog(
        AuditConfig(backend="postgres", signing_key_file=str(key_file), checkpoint_every=5), DatabaseConfig(pool_max=3), dsn=writer_dsn
    )
    await log.start()
    for i in range(12):
        await log.record_exchange(make_exchange(request_id=f"req_w_{i}"))
    await log.record_event("tools.mode", {"subject": "admin"}, {"mode": "enforce"})
    assert (await log.find("req_w_3")) is not None
    await log.stop()

    conn = await asyncpg.connect(writer_dsn)
    try:
        assert await conn.fetchval("SELECT current_user") != "postgres"
        for sql in (
            "UPDATE audit_records SET status = 500 WHERE seq = 3",
            "DELETE FROM audit_records WHERE seq = 12",
            "TRUNCATE audit_records",
            "UPDATE audit_checkpoints SET note = 'forged'",
            "DELETE FROM audit_checkpoints",
            "DELETE FROM audit_keys",
            "DELETE FROM audit_chains",
            "UPDATE audit_chains SET pruned_through = 10",
            "UPDATE warden_schema SET version = 1",
        ):
            assert "permission denied" in await _refused(conn, sql), sql
        # What it may update — the head — only moves forward.
        assert "forward" in await _refused(conn, "UPDATE audit_chains SET seq = 1")
        assert await conn.fetchval("SELECT count(*) FROM audit_records") == 13
    finally:
        await conn.close()
    report = await verify_pg(writer_dsn)
    assert report.ok, report.render()


async def test_retention_prunes_old_records_to_a_checkpoint_through_the_definer_functions(roles: tuple[str, str, str], key_file: Path) -> None:
    _owner_dsn, writer_dsn, _schema = roles
    cfg = AuditConfig(backend="postgres", signing_key_file=str(key_file), checkpoint_every=10, durability="sync")
    log = PostgresAuditLog(cfg, DatabaseConfig(pool_max=3), dsn=writer_dsn)
    await log.start()
    old = time.time() - 3 * 86400
    for i in range(25):  # 3 days old: checkpoints at 10 and 20
        ex = make_exchange(request_id=f"req_old_{i:02d}")
        ex.wall_time = old + i
        await log.record_exchange(ex)
    for i in range(5):
        await log.record_exchange(make_exchange(request_id=f"req_new_{i}"))
    log.cfg.retention_days = 1
    deleted = await log.prune()
    assert deleted == 20  # up to the checkpoint at 20; 21..25 are old but past the last checkpoint before them
    rows = await log.search(kind="retention_prune")
    assert rows and rows[0]["data"]["deleted"] == 20 and rows[0]["data"]["chains"][0]["through"] == 20
    await log.stop()
    report = await verify_pg(writer_dsn)
    assert report.ok, report.render()
    assert [(r.first_seq, r.last_seq) for r in report.chains] == [(21, 31)]  # 30 exchanges and the retention_prune record
    conn = await asyncpg.connect(writer_dsn)
    try:
        # A cut younger than a day is refused, whoever asks.
        with pytest.raises(asyncpg.exceptions.InvalidParameterValueError):
            await conn.fetchval("SELECT audit_prune_mark(1, $1)", int(time.time() * 1e6) - 3600 * 10**6)
        # The functions delete nothing above the mark.
        assert await conn.fetchval("SELECT audit_prune_chunk(1, 1000)") == 0
    finally:
        await conn.close()


async def test_a_role_without_the_grants_cannot_start_a_replica(pg_admin: asyncpg.Connection, pg_dsn: str, key_file: Path) -> None:
    role = f"wn_{secrets.token_hex(4)}"
    schema = pg_dsn.rsplit("%3D", 1)[1]
    await pg_admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await pg_admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        await pg_admin.execute(f"GRANT SELECT ON {schema}.warden_schema TO {role}")
        dsn = schema_dsn(schema, f"postgresql://{role}@{BASE_DSN.split('@', 1)[1]}")
        log = PostgresAuditLog(AuditConfig(backend="postgres", signing_key_file=str(key_file)), DatabaseConfig(pool_max=3), dsn=dsn)
        with pytest.raises(AuditUnavailable, match="permission denied for table audit_chains"):
            await log.start()
        assert not log.healthy
    finally:
        await pg_admin.execute(f"DROP OWNED BY {role}")
        await pg_admin.execute(f"DROP ROLE {role}")
