"""Fixtures for tests against the real PostgreSQL: a schema of each test's own (import them in a conftest.py).

The server is ``$WARDEN_TEST_DATABASE_URL`` or ``postgresql://postgres@127.0.0.1:5432/test``.
Each test gets a fresh schema (``wt_<random>``, dropped afterwards) named in
its DSN's ``search_path``, so tests run in parallel without seeing each
other.  When no server answers, the tests are skipped — unless ``CI`` is set:
there they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

BASE_DSN = os.environ.get("WARDEN_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
_reachable: bool | None = None


async def _probe() -> bool:
    global _reachable
    if _reachable is None:
        try:
            conn = await asyncpg.connect(BASE_DSN, timeout=3)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            _reachable = False
        else:
            await conn.close()
            _reachable = True
    return _reachable


def schema_dsn(schema: str, dsn: str = BASE_DSN) -> str:
    """``dsn`` with ``search_path`` set to ``schema`` (libpq's ``options``, which asyncpg reads too)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture
async def pg_admin() -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the test database (skips, or fails in CI, when there is none)."""
    if not await _probe():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {BASE_DSN.split('@')[-1]} is not reachable (CI is set: the PostgreSQL tests must run)")
        pytest.skip(f"no PostgreSQL reachable at {BASE_DSN.split('@')[-1]} (set WARDEN_TEST_DATABASE_URL, or start one)")
    conn = await asyncpg.connect(BASE_DSN)
    yield conn
    await conn.close()


@pytest.fixture
async def pg_schema(pg_admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A fresh, empty schema; yields its DSN (its name is the DSN's search_path)."""
    schema = f"wt_{secrets.token_hex(6)}"
    await pg_admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema_dsn(schema)
    finally:
        await pg_admin.execute(f"DROP SCHEMA {schema} CASCADE")


def schema_of(dsn: str) -> str:
    """The schema a :func:`schema_dsn` names."""
    return dsn.rsplit("%3D", 1)[1]
