"""The shared store of record on PostgreSQL (``[retrieval] store = "postgres"``).

Same content as the SQLite store (documents, chunks with vectors, ACLs,
change log), shared by every replica; the schema is the ``retrieval``
component of ``warden db migrate`` (``plugins/retrieval/migrations``), and a
replica refuses to start on a schema at another version.

**Positions in commit order.**  Change-log positions come from a sequence,
assigned by a trigger under a transaction-scoped advisory lock that is
released only after the commit is visible (see ``0001_store.sql``): a reader
that sees position ``p`` sees every committed position below it, so "every
change after my position" never skips a change that commits late.  Writers
insert their change rows as the last step before ``COMMIT``, so the lock
covers only that step; the trigger also sends the ``NOTIFY`` every replica
waits on.  Rolled-back transactions leave gaps, which readers ignore.

**Counters** (``retrieval_stats``) are adjusted by each write from the rows
it replaced or deleted (``DELETE ... RETURNING``), after the change-log
lock: no recount, and no extra lock held over the transaction.

Every statement runs under ``command_timeout`` (``store_timeout_s``):
PostgreSQL unreachable is an error, never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import numpy as np
import orjson

from llm_warden.plugins.retrieval.records import Change, ChangeBatch, ChunkRow, DocumentRow, blob_vector, vector_blob
from llm_warden.proxy.db.migrate import check_schema, latest_version
from llm_warden.proxy.errors import ServiceUnavailable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
COMPONENT = "retrieval"
LOCK_CLASS = 1465011271  # the change-log lock's first key (0001_store.sql); the second is hashtext(schema)
_RETRY = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# PostgreSQL unreachable, restarting, or this connection terminated: the store is unavailable (503).
_DOWN = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError)
_META_KEYS = ["pruned_upto", "vectors_generation", "embedding_model", "embedding_dim"]

_DOC_COLS = "tenant, doc_id, source, uri, title, updated_at, content_hash, labels, acl, indexed_at, embedding_model, n_chunks, tokens, size"
_CHUNK_COLS = "chunk_id, tenant, doc_id, n, heading_path, start_offset, end_offset, kind, text, index_text, tokens"
_HEAD = ("greatest(coalesce((SELECT max(pos) FROM retrieval_changes), 0), "
         "(SELECT value::bigint FROM retrieval_meta WHERE key = 'pruned_upto'))")

T = TypeVar("T")
log = logging.getLogger("warden.retrieval")


def channel_for(schema: str) -> str:
    """The NOTIFY channel of the store in ``schema`` (what the trigger computes)."""
    return "warden_retrieval_" + hashlib.md5(schema.encode()).hexdigest()  # noqa: S324 - a name, not a digest of secrets


def _doc(r: Any, at: int = 0) -> DocumentRow:
    return DocumentRow(
        tenant=r[at], doc_id=r[at + 1], source=r[at + 2], uri=r[at + 3], title=r[at + 4], updated_at=r[at + 5], content_hash=r[at + 6],
        labels=orjson.loads(r[at + 7]), acl=orjson.loads(r[at + 8]), indexed_at=r[at + 9], embedding_model=r[at + 10],
        n_chunks=r[at + 11], tokens=r[at + 12], size=r[at + 13],
    )


def _chunk(r: Any, with_vector: bool) -> ChunkRow:
    return ChunkRow(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], blob_vector(r[11]) if with_vector else None)


def _counts(r: Any) -> dict[str, Any]:
    return {"documents": int(r[0]), "chunks": int(r[1]), "vectors": int(r[2]), "last_ingest": r[3], "oldest_source_update": r[5], "tenants": int(r[4])}


_last_logged = 0.0


def _unavailable(e: BaseException) -> ServiceUnavailable:
    """The refusal for a store that cannot be reached; its cause goes to the log (at most every 10 s), never to a client
    (the message can reach a data-plane caller through ``on_error = "fail"``: no host, port or driver text in it)."""
    global _last_logged
    now = time.monotonic()
    if now - _last_logged >= 10.0:
        _last_logged = now
        log.warning("retrieval: the PostgreSQL store is unavailable: %s: %s", type(e).__name__, e)
    return ServiceUnavailable("the retrieval store (PostgreSQL) is unavailable", rule="retrieval.store")


class _PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection released without asyncpg's reset query (a round trip per release).

    The store's pooled connections never LISTEN, SET session settings, open
    cursors or hold session advisory locks (those use connections of their
    own), so there is nothing to reset; an open transaction is still rolled
    back on release.
    """

    def get_reset_query(self) -> str:
        return ""


class PostgresStore:
    """The retrieval store of record on PostgreSQL (open with :meth:`open`)."""

    kind = "postgres"

    def __init__(self, dsn: str, *, pool_min: int = 1, pool_max: int = 10, timeout_s: float = 10.0, application_name: str = "warden-retrieval") -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.timeout_s = timeout_s
        self.schema = ""
        self._pool: asyncpg.Pool | None = None

    @staticmethod
    def _settings(application_name: str) -> dict[str, str]:
        # Plan every statement for the tables as they are now: a generic plan cached while they were
        # small (a seq scan) would otherwise stay in use as they grow, and each write would scan them whole.
        return {"application_name": application_name, "plan_cache_mode": "force_custom_plan"}

    @property
    def channel(self) -> str:
        return channel_for(self.schema)

    async def open(self) -> None:
        """Open the pool and check the schema version (``warden db migrate`` creates it)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=min(self.pool_min, self.pool_max), max_size=self.pool_max, command_timeout=self.timeout_s,
                timeout=self.timeout_s, server_settings=self._settings(self.application_name), connection_class=_PooledConnection,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise _unavailable(e) from None
        try:
            async with self.pool.acquire() as conn:
                await check_schema(conn, COMPONENT, latest_version(MIGRATIONS))
                self.schema = str(await conn.fetchval("SELECT current_schema()"))
        except BaseException:
            await self.close()
            raise

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own (the follower's LISTEN connection), with the pool's settings."""
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn, timeout=self.timeout_s, command_timeout=self.timeout_s,
                                                         server_settings=self._settings(f"{self.application_name}-follower"))
        return conn

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def _q(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn`` on a pooled connection; PostgreSQL down is a 503 naming the store, never a hang."""
        try:
            async with self.pool.acquire() as conn:
                return await fn(conn)
        except _DOWN as e:
            raise _unavailable(e) from None

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._q(lambda c: c.fetch(sql, *args))

    async def _tx(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """One write transaction, retried when it lost a race (a deadlock, a concurrent insert of the same new row)."""

        async def run(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self._retrying(run)

    async def _retrying(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        for attempt in range(5):
            try:
                return await self._q(fn)
            except _RETRY:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """A session advisory lock of this schema, on a connection of its own (closing it releases the lock):
        one replica of the fleet at a time (re-embedding)."""
        conn = await self.connect()
        try:
            await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"retrieval.{name}.{self.schema}", timeout=None)
            yield
        finally:
            await conn.close()

    async def identity(self) -> str:
        return await self.get_meta("store_id") or ""

    # -- reads -----------------------------------------------------------

    async def get_document(self, tenant: str, doc_id: str) -> DocumentRow | None:
        rows = await self._fetch(f"SELECT {_DOC_COLS} FROM retrieval_documents WHERE tenant = $1 AND doc_id = $2", tenant, doc_id)
        return _doc(rows[0]) if rows else None

    async def get_documents(self, tenant: str, doc_ids: Iterable[str]) -> dict[str, DocumentRow]:
        ids = list(doc_ids)
        if not ids:
            return {}
        rows = await self._fetch(f"SELECT {_DOC_COLS} FROM retrieval_documents WHERE tenant = $1 AND doc_id = ANY($2::text[])", tenant, ids)
        return {r[1]: _doc(r) for r in rows}

    async def list_documents(self, tenant: str, limit: int = 100, after: str = "", source_prefix: str | None = None) -> list[DocumentRow]:
        if source_prefix is None:
            rows = await self._fetch(
                f"SELECT {_DOC_COLS} FROM retrieval_documents WHERE tenant = $1 AND doc_id > $2 ORDER BY doc_id LIMIT $3", tenant, after, limit
            )
        else:
            rows = await self._fetch(
                f"SELECT {_DOC_COLS} FROM retrieval_documents WHERE tenant = $1 AND doc_id > $2 AND starts_with(source, $4) ORDER BY doc_id LIMIT $3",
                tenant, after, limit, source_prefix,
            )
        return [_doc(r) for r in rows]

    async def chunks_of(self, keys: Iterable[tuple[str, str]], with_vector: bool = True) -> dict[tuple[str, str], list[ChunkRow]]:
        keys = list(keys)
        out: dict[tuple[str, str], list[ChunkRow]] = {k: [] for k in keys}
        if not keys:
            return out
        vec = "c.vector" if with_vector else "NULL::bytea"
        cols = ", ".join(f"c.{c}" for c in _CHUNK_COLS.split(", "))
        rows = await self._fetch(
            f"SELECT {cols}, {vec} FROM retrieval_chunks c JOIN unnest($1::text[], $2::text[]) AS k(t, d) ON c.tenant = k.t AND c.doc_id = k.d "
            "ORDER BY c.tenant, c.doc_id, c.n",
            [k[0] for k in keys], [k[1] for k in keys],
        )
        for r in rows:
            out[(r[1], r[2])].append(_chunk(r, with_vector))
        return out

    async def fetch_chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, tuple[ChunkRow, DocumentRow]]:
        if not chunk_ids:
            return {}
        cols = ", ".join(f"c.{c}" for c in _CHUNK_COLS.split(", "))
        dcols = ", ".join(f"d.{c}" for c in _DOC_COLS.split(", "))
        rows = await self._fetch(
            f"SELECT {cols}, NULL::bytea, {dcols} FROM retrieval_chunks c "
            "JOIN retrieval_documents d ON d.tenant = c.tenant AND d.doc_id = c.doc_id "
            "WHERE c.tenant = $1 AND c.chunk_id = ANY($2::text[])",
            tenant, chunk_ids,
        )
        return {r[0]: (_chunk(r, False), _doc(r, 12)) for r in rows}

    async def iter_chunks(self, batch: int = 2000, with_vector: bool = True) -> AsyncIterator[tuple[list[ChunkRow], dict[tuple[str, str], dict[str, Any]]]]:
        last = ""
        vec = "c.vector" if with_vector else "NULL::bytea"
        cols = ", ".join(f"c.{c}" for c in _CHUNK_COLS.split(", "))
        while True:
            raw = await self._fetch(
                f"SELECT {cols}, {vec}, d.acl FROM retrieval_chunks c JOIN retrieval_documents d ON d.tenant = c.tenant AND d.doc_id = c.doc_id "
                "WHERE c.chunk_id > $1 ORDER BY c.chunk_id LIMIT $2",
                last, batch,
            )
            if not raw:
                return
            last = raw[-1][0]
            yield [_chunk(r, with_vector) for r in raw], {(r[1], r[2]): orjson.loads(r[12]) for r in raw}

    async def changes_after(self, seq: int, limit: int = 10_000) -> ChangeBatch:
        # One statement, so one snapshot: the changes, the head and the pruned bound agree.
        rows = await self._fetch(
            f"""WITH ch AS (SELECT pos, tenant, doc_id, op FROM retrieval_changes WHERE pos > $1 ORDER BY pos LIMIT $2)
            SELECT {_HEAD}, (SELECT coalesce(jsonb_object_agg(key, value), '{{}}') FROM retrieval_meta WHERE key = ANY($3::text[])),
                   array_agg(pos ORDER BY pos), array_agg(tenant ORDER BY pos), array_agg(doc_id ORDER BY pos), array_agg(op ORDER BY pos)
            FROM ch""",
            seq, limit, _META_KEYS,
        )
        head, meta_raw, pos, tenants, doc_ids, ops = rows[0]
        meta = orjson.loads(meta_raw)
        changes = [Change(*c) for c in zip(pos, tenants, doc_ids, ops, strict=True)] if pos else []
        dim = meta.get("embedding_dim")
        return ChangeBatch(changes, int(head), int(meta.get("pruned_upto") or 0), str(meta.get("vectors_generation") or ""),
                           meta.get("embedding_model"), int(dim) if dim else None)

    async def head(self) -> int:
        return int(await self._q(lambda c: c.fetchval(f"SELECT {_HEAD}")))

    async def oldest_change_after(self, seq: int) -> float | None:
        v = await self._q(lambda c: c.fetchval("SELECT at FROM retrieval_changes WHERE pos > $1 ORDER BY pos LIMIT 1", seq))
        return None if v is None else float(v)

    def _counts_sql(self, tenant: str | None) -> tuple[str, list[Any]]:
        where, params = ("WHERE tenant = $1", [tenant]) if tenant is not None else ("", [])
        return (
            "SELECT coalesce(sum(documents), 0), coalesce(sum(chunks), 0), coalesce(sum(vectors), 0), max(last_ingest), "
            f"count(*) FILTER (WHERE documents > 0), (SELECT min(updated_at) FROM retrieval_documents {where}) FROM retrieval_stats {where}",
            params,
        )

    async def counts(self, tenant: str | None = None) -> dict[str, Any]:
        sql, params = self._counts_sql(tenant)
        return _counts((await self._fetch(sql, *params))[0])

    async def counts_at_head(self) -> tuple[int, dict[str, Any]]:
        sql, _ = self._counts_sql(None)
        row = (await self._fetch(f"SELECT s.*, {_HEAD} FROM ({sql}) s"))[0]
        return int(row[6]), _counts(row)

    async def tenant_counts(self) -> dict[str, tuple[int, int]]:
        return {r[0]: (int(r[1]), int(r[2])) for r in await self._fetch("SELECT tenant, documents, chunks FROM retrieval_stats")}

    async def distinct_acls(self, tenant: str, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT DISTINCT acl FROM retrieval_documents WHERE tenant = $1 LIMIT $2", tenant, limit)
        return [orjson.loads(r[0]) for r in rows]

    async def all_doc_keys(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in await self._fetch("SELECT tenant, doc_id FROM retrieval_documents")]

    async def embedding_models(self) -> dict[str | None, int]:
        return {r[0]: int(r[1]) for r in await self._fetch("SELECT embedding_model, count(*) FROM retrieval_documents GROUP BY embedding_model")}

    async def get_meta(self, key: str) -> str | None:
        v = await self._q(lambda c: c.fetchval("SELECT value FROM retrieval_meta WHERE key = $1", key))
        return None if v is None else str(v)

    # -- writes ----------------------------------------------------------

    async def set_meta(self, key: str, value: str) -> None:
        await self._q(lambda c: c.execute(
            "INSERT INTO retrieval_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value", key, value))

    async def write_documents(self, items: list[tuple[DocumentRow, list[ChunkRow]]]) -> int:
        now = time.time()
        docs = [d for d, _ in items]
        chunks = [c for _, cs in items for c in cs]
        args = (
            [d.tenant for d in docs], [d.doc_id for d in docs], [d.source for d in docs], [d.uri for d in docs], [d.title for d in docs],
            [d.updated_at for d in docs], [d.content_hash for d in docs], [orjson.dumps(d.labels).decode() for d in docs],
            [orjson.dumps(d.acl).decode() for d in docs], [d.indexed_at or now for d in docs], [d.embedding_model for d in docs],
            [d.n_chunks for d in docs], [d.tokens for d in docs], [d.size for d in docs],
            [sum(1 for c in cs if c.vector is not None) for _, cs in items],
            [c.chunk_id for c in chunks], [c.tenant for c in chunks], [c.doc_id for c in chunks], [c.n for c in chunks],
            [orjson.dumps(c.heading_path).decode() for c in chunks], [c.start for c in chunks], [c.end for c in chunks],
            [c.kind for c in chunks], [c.text for c in chunks], [c.index_text for c in chunks], [c.tokens for c in chunks],
            [vector_blob(c.vector) for c in chunks], now,
        )
        # One statement (0001_store.sql): one round trip and its own transaction.
        sql = f"SELECT retrieval_write_documents({', '.join(f'${i}' for i in range(1, 29))})"
        return int(await self._retrying(lambda c: c.fetchval(sql, *args)))

    async def update_documents_meta(self, docs: list[DocumentRow], acl_changed: list[bool]) -> int:
        now = time.time()
        pairs = sorted(zip(docs, acl_changed, strict=True), key=lambda p: (p[0].tenant, p[0].doc_id))

        async def tx(c: asyncpg.Connection) -> int:
            await c.execute(
                "UPDATE retrieval_documents d SET source = x.s, uri = x.u, updated_at = x.up, labels = x.l, acl = x.a::jsonb, indexed_at = $8 "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS x(t, i, s, u, up, l, a) "
                "WHERE d.tenant = x.t AND d.doc_id = x.i",
                [d.tenant for d, _ in pairs], [d.doc_id for d, _ in pairs], [d.source for d, _ in pairs], [d.uri for d, _ in pairs],
                [d.updated_at for d, _ in pairs], [orjson.dumps(d.labels).decode() for d, _ in pairs],
                [orjson.dumps(d.acl).decode() for d, _ in pairs], now,
            )
            changed = [d for d, ch in pairs if ch]
            pos = await self._log(c, [d.tenant for d in changed], [d.doc_id for d in changed], "acl", now) if changed else 0
            await self._stats(c, {d.tenant: [0, 0, 0] for d, _ in pairs}, now)
            return pos

        return await self._tx(tx)

    async def delete_documents(self, keys: list[tuple[str, str]]) -> tuple[int, int]:
        keys = sorted(set(keys))
        row = await self._retrying(lambda c: c.fetchrow(
            "SELECT o_deleted, o_pos FROM retrieval_delete_documents($1, $2, $3)", [k[0] for k in keys], [k[1] for k in keys], time.time()))
        return int(row["o_deleted"]), int(row["o_pos"])

    async def set_vectors(self, rows: list[tuple[str, np.ndarray]], model: str, docs: list[tuple[str, str]]) -> None:
        async def tx(c: asyncpg.Connection) -> None:
            if rows:
                await c.execute(
                    "UPDATE retrieval_chunks c SET vector = x.v FROM unnest($1::text[], $2::bytea[]) AS x(id, v) WHERE c.chunk_id = x.id",
                    [cid for cid, _ in rows], [vector_blob(v) for _, v in rows],
                )
            if docs:
                await c.execute(
                    "UPDATE retrieval_documents d SET embedding_model = $3, n_vectors = (SELECT count(*) FROM retrieval_chunks c "
                    "WHERE c.tenant = d.tenant AND c.doc_id = d.doc_id AND c.vector IS NOT NULL) "
                    "FROM unnest($1::text[], $2::text[]) AS k(t, i) WHERE d.tenant = k.t AND d.doc_id = k.i",
                    [t for t, _ in docs], [d for _, d in docs], model,
                )

        await self._tx(tx)

    async def new_vectors_generation(self) -> str:
        gen = uuid.uuid4().hex

        async def tx(c: asyncpg.Connection) -> None:
            # Under the change-log lock, so no write adjusts the vector counters while they are recounted.
            await c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", LOCK_CLASS, self.schema)
            await c.execute("UPDATE retrieval_stats s SET vectors = (SELECT coalesce(sum(n_vectors), 0) FROM retrieval_documents d WHERE d.tenant = s.tenant)")
            await c.execute("INSERT INTO retrieval_meta (key, value) VALUES ('vectors_generation', $1) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", gen)

        await self._tx(tx)
        return gen

    async def prune(self, applied: int, retention_s: float) -> int:
        """Drop entries older than ``retention_s`` (replicas' positions are local, so age is the only bound).

        A replica whose position falls below ``pruned_upto`` (down longer than
        the retention) rebuilds its indexes from the documents.
        """
        cutoff = time.time() - retention_s

        async def tx(c: asyncpg.Connection) -> int:
            return int(await c.fetchval(
                "WITH gone AS (DELETE FROM retrieval_changes WHERE at < $1 RETURNING pos) "
                "UPDATE retrieval_meta SET value = greatest(value::bigint, coalesce((SELECT max(pos) FROM gone), 0))::text "
                "WHERE key = 'pruned_upto' RETURNING value::bigint", cutoff))

        return await self._tx(tx)

    @staticmethod
    async def _log(c: asyncpg.Connection, tenants: list[str], doc_ids: list[str], op: str, now: float) -> int:
        """Append change-log entries; the trigger assigns positions under the change-log lock (held to COMMIT)."""
        if not tenants:
            return 0
        return int(await c.fetchval(
            "WITH ins AS (INSERT INTO retrieval_changes (tenant, doc_id, op, at) SELECT t, i, $3, $4 FROM unnest($1::text[], $2::text[]) AS k(t, i) "
            "RETURNING pos) SELECT max(pos) FROM ins", tenants, doc_ids, op, now))

    @staticmethod
    async def _stats(c: asyncpg.Connection, delta: dict[str, list[float]], now: float | None) -> None:
        if not delta:
            return
        tenants = sorted(delta)
        await c.execute(
            "INSERT INTO retrieval_stats AS s (tenant, documents, chunks, vectors, last_ingest) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::float8[]) "
            "ON CONFLICT (tenant) DO UPDATE SET documents = s.documents + excluded.documents, chunks = s.chunks + excluded.chunks, "
            "vectors = s.vectors + excluded.vectors, last_ingest = greatest(s.last_ingest, excluded.last_ingest)",
            tenants, [int(delta[t][0]) for t in tenants], [int(delta[t][1]) for t in tenants], [int(delta[t][2]) for t in tenants],
            [now] * len(tenants),
        )
