"""The retrieval tests' PostgreSQL: a fresh, migrated schema per test, and a TCP relay that can cut a replica off.

The server is ``$WARDEN_TEST_DATABASE_URL`` or ``postgresql://postgres@127.0.0.1:5432/test``.
Each test gets its own schema (``wr_<random>``, dropped afterwards) named in
its DSN's ``search_path`` (tables, change-log lock and NOTIFY channel are all
per schema), so tests run in parallel without seeing each other.  When no
server answers the tests are skipped, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from llm_warden.plugins.retrieval.pgstore import MIGRATIONS
from llm_warden.proxy.db.migrate import migrate

BASE_DSN = os.environ.get("WARDEN_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
_reachable: bool | None = None


async def reachable() -> bool:
    global _reachable
    if _reachable is None:
        try:
            conn = await asyncpg.connect(BASE_DSN, timeout=3)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            _reachable = False
        else:
            await conn.close()
            _reachable = True
    return _reachable


async def require_pg() -> None:
    if not await reachable():
        where = BASE_DSN.split("@")[-1]
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {where} is not reachable (CI is set: the PostgreSQL tests must run)")
        pytest.skip(f"no PostgreSQL reachable at {where} (set WARDEN_TEST_DATABASE_URL, or start one)")


def schema_dsn(schema: str, dsn: str = BASE_DSN) -> str:
    """``dsn`` with ``search_path`` set to ``schema`` (libpq's ``options``, which asyncpg reads too)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"


@contextlib.asynccontextmanager
async def fresh_schema(*, migrated: bool = True) -> AsyncIterator[str]:
    """A new schema (migrated to the retrieval schema unless told otherwise); yields its DSN; dropped afterwards."""
    await require_pg()
    schema = f"wr_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(BASE_DSN)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        dsn = schema_dsn(schema)
        if migrated:
            await migrate(dsn, "retrieval", MIGRATIONS)
        yield dsn
    finally:
        # Whatever the test left connected to this schema goes first (a DROP would wait on its locks).
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1", f"%{schema}%")
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


def schema_of(dsn: str) -> str:
    return dsn.rsplit("%3D", 1)[1]


async def terminate(application_name: str) -> int:
    """``pg_terminate_backend`` every connection with this application name (a dropped connection, server side)."""
    admin = await asyncpg.connect(BASE_DSN)
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()", application_name
        )
        return len(rows)
    finally:
        await admin.close()


class Relay:
    """A TCP relay to PostgreSQL that a test can cut (every connection through it dies, new ones are refused) and restore."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5432) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def dsn(self, schema: str) -> str:
        user_db = BASE_DSN.split("@", 1)
        head, tail = user_db[0], user_db[1].split("/", 1)[1]
        return schema_dsn(schema, f"{head}@127.0.0.1:{self.port}/{tail}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers -= {writer, up_w}

    async def cut(self) -> None:
        """Close the listening socket and every relayed connection."""
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()
