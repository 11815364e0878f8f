"""Fixtures of the PostgreSQL audit tests: a migrated schema of each test's own, a fleet key, started stores."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llm_warden.proxy.audit.chain import seed_bytes
from llm_warden.proxy.audit.postgres import PostgresAuditLog
from llm_warden.proxy.config import AuditConfig, DatabaseConfig
from llm_warden.proxy.db.migrate import COMPONENTS, migrate
from tests import pg_helpers

pg_admin = pg_helpers.pg_admin
pg_schema = pg_helpers.pg_schema


@pytest.fixture
async def pg_dsn(pg_schema: str) -> str:
    """A fresh schema with the audit migrations applied."""
    await migrate(pg_schema, "audit", COMPONENTS["audit"])
    return pg_schema


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fleet signing key (base64 seed) in a file."""
    path = tmp_path / "fleet.key"
    path.write_text(base64.b64encode(seed_bytes(Ed25519PrivateKey.generate())).decode())
    return path


PgLogFactory = Callable[..., Awaitable[PostgresAuditLog]]


@pytest.fixture
async def make_pg_log(pg_dsn: str, key_file: Path) -> AsyncIterator[PgLogFactory]:
    """Start stores (replicas) on the test schema; each is stopped at the end unless the test stopped it."""
    logs: list[PostgresAuditLog] = []

    async def _make(*, dsn: str | None = None, upstream_key: str | None = None, pool_max: int = 4, **cfg: Any) -> PostgresAuditLog:
        cfg.setdefault("signing_key_file", str(key_file))
        log = PostgresAuditLog(
            AuditConfig(backend="postgres", **cfg), DatabaseConfig(pool_min=1, pool_max=pool_max), dsn=dsn or pg_dsn, upstream_key=upstream_key, provider="openai"
        )
        await log.start()
        logs.append(log)
        return log

    yield _make
    for log in logs:
        await log.stop()
