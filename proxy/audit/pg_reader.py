"""Read-only queries over the PostgreSQL audit store: find, search, export (the SQLite reader's API).

Records carry ``_seq`` (their position in their chain) and ``_origin`` (the
chain).  Sequence numbers are per chain, so "newest" means the newest
``ts_us`` across chains.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson

from llm_warden.proxy.audit.reader import ChainProof, cursor_int, like_pattern

_SELECT = "SELECT c.origin, r.chain_id, r.ts_us, r.seq, r.body FROM audit_records r JOIN audit_chains c USING (chain_id)"


class PgAuditReader:
    """Queries over an ``asyncpg`` pool (the store's own, or the CLI's)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str) -> PgAuditReader:
        """A reader on a small pool of its own (for the CLI); refuses a schema this Warden does not know."""
        from llm_warden.proxy.db.migrate import COMPONENTS, check_schema, latest_version

        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, server_settings={"application_name": "warden-audit-cli"})
        try:
            async with pool.acquire() as conn:
                await check_schema(conn, "audit", latest_version(COMPONENTS["audit"]))
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The newest exchange record of ``request_id`` (in ``tenant`` when given), or ``None``."""
        sql = _SELECT + " WHERE r.request_id = $1 AND r.kind = 'exchange'"
        args: list[Any] = [request_id]
        if tenant is not None:
            sql += " AND r.tenant = $2"
            args.append(tenant)
        row = await self.pool.fetchrow(sql + " ORDER BY r.ts_us DESC, r.chain_id DESC, r.seq DESC LIMIT 1", *args)
        return None if row is None else _record(row)

    async def related(self, request_id: str) -> list[dict[str, Any]]:
        """Every other record naming ``request_id`` (feedback, approvals, ...), oldest first."""
        rows = await self.pool.fetch(_SELECT + " WHERE r.request_id = $1 AND r.kind <> 'exchange' ORDER BY r.ts_us, r.chain_id, r.seq", request_id)
        return [_record(r) for r in rows]

    async def find_call(self, tool_call_id: str) -> dict[str, Any] | None:
        """The exchange whose model emitted ``tool_call_id`` (a scan; for ``show``)."""
        row = await self.pool.fetchrow(
            _SELECT + " WHERE r.call_ids LIKE $1 ESCAPE '\\' ORDER BY r.ts_us DESC LIMIT 1", f"%,{like_pattern(tool_call_id)},%"
        )
        return None if row is None else _record(row)

    async def search(
        self,
        tenant: str | None = None,
        user: str | None = None,
        tool: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
        kind: str | None = None,
        *,
        request_id: str | None = None,
        status: int | None = None,
        before: str | None = None,
    ) -> list[dict[str, Any]]:
        """Records matching every given filter, newest first (``since``/``until``: µs since the epoch, inclusive/exclusive).

        Each record carries ``_cursor`` (``ts_us.chain_id.seq``); passing the
        last one as ``before`` returns the next page (keyset pagination).  A
        cursor that is not one of ours is a ``ValueError``.
        """
        where: list[str] = []
        args: list[Any] = []

        def arg(v: Any) -> str:
            args.append(v)
            return f"${len(args)}"

        if before is not None:
            parts = before.split(".")
            if len(parts) != 3:
                raise ValueError("not a cursor of this audit store")
            ts_us, chain_id, seq = (cursor_int(p) for p in parts)
            where.append(f"(r.ts_us, r.chain_id, r.seq) < ({arg(ts_us)}, {arg(chain_id)}, {arg(seq)})")
        if request_id is not None:
            where.append(f"r.request_id = {arg(request_id)}")
        if status is not None:
            where.append(f"r.status = {arg(status)}")

        if tenant is not None:
            where.append(f"r.tenant = {arg(tenant)}")
        if user is not None:
            where.append(f"r.subject = {arg(user)}")
        if tool is not None:
            where.append(f"r.tools LIKE {arg(f'%,{like_pattern(tool)},%')} ESCAPE '\\'")
        if since is not None:
            where.append(f"r.ts_us >= {arg(since)}")
        if until is not None:
            where.append(f"r.ts_us < {arg(until)}")
        if kind is not None:
            where.append(f"r.kind = {arg(kind)}")
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY r.ts_us DESC, r.chain_id DESC, r.seq DESC LIMIT {arg(max(1, min(int(limit), 100_000)))}"
        return [_record(r) for r in await self.pool.fetch(sql, *args)]

    async def chain_proof(self, seq: int, origin: str | None = None) -> ChainProof | None:
        """What shows record ``seq`` of chain ``origin`` in its chain (see the SQLite reader); ``None`` when there is none."""
        if origin is None:
            return None
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            chain_id = await conn.fetchval("SELECT chain_id FROM audit_chains WHERE origin = $1", origin)
            if chain_id is None:
                return None
            rows = {
                int(r["seq"]): r
                for r in await conn.fetch(
                    "SELECT seq, prev_hash, hash, body FROM audit_records WHERE chain_id = $1 AND seq IN ($2, $3)", chain_id, seq - 1, seq
                )
            }
            if seq not in rows:
                return None
            note = await conn.fetchval("SELECT note FROM audit_checkpoints WHERE chain_id = $1 ORDER BY size DESC LIMIT 1", chain_id)
            keys = [str(r["verifier"]) for r in await conn.fetch("SELECT verifier FROM audit_keys")]
        row, before = rows[seq], rows.get(seq - 1)
        return ChainProof(
            origin=origin,
            seq=seq,
            prev_hash=bytes(row["prev_hash"]),
            hash=bytes(row["hash"]),
            body=bytes(row["body"]),
            previous_hash=bytes(before["hash"]) if before is not None else None,
            checkpoint=str(note) if note is not None else None,
            keys=keys,
        )

    async def iter_records(self, page: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Every record as ``{origin, seq, prev_hash, hash, record}`` (hex hashes), chain by chain in chain order.

        One read-only snapshot (``REPEATABLE READ``) for the whole export.
        """
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            chains = await conn.fetch("SELECT chain_id, origin FROM audit_chains ORDER BY chain_id")
            for ch in chains:
                cur = conn.cursor(
                    "SELECT seq, prev_hash, hash, body FROM audit_records WHERE chain_id = $1 ORDER BY seq", ch["chain_id"], prefetch=page
                )
                async for r in cur:
                    yield {
                        "origin": ch["origin"],
                        "seq": int(r["seq"]),
                        "prev_hash": bytes(r["prev_hash"]).hex(),
                        "hash": bytes(r["hash"]).hex(),
                        "record": orjson.loads(r["body"]),
                    }


def _record(row: Any) -> dict[str, Any]:
    rec: dict[str, Any] = orjson.loads(row["body"])
    rec["_seq"] = int(row["seq"])
    rec["_origin"] = row["origin"]
    rec["_cursor"] = f"{row['ts_us']}.{row['chain_id']}.{row['seq']}"
    return rec
