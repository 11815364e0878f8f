"""Read-only queries over an audit database: find, search, export, verify."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import orjson


class AuditReader:
    """Read-only queries over an audit database (used by the store and the CLI)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> AuditReader:
        """Open ``path`` read-only."""
        if not await asyncio.to_thread(path.exists):
            raise FileNotFoundError(f"audit database {path} does not exist")
        db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
        await db.execute("PRAGMA busy_timeout = 10000")
        return cls(db)

    async def close(self) -> None:
        await self.db.close()

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The newest exchange record of ``request_id`` (with ``_seq``), in ``tenant`` when given, or ``None``.

        Request ids come from clients and can repeat across tenants: a lookup on
        a tenant's behalf must name the tenant.
        """
        sql = "SELECT seq, body FROM records WHERE request_id = ? AND kind = 'exchange'"
        params: tuple[str, ...] = (request_id,)
        if tenant is not None:
            sql += " AND tenant = ?"
            params = (request_id, tenant)
        async with self.db.execute(sql + " ORDER BY seq DESC LIMIT 1", params) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        rec: dict[str, Any] = orjson.loads(row[1])
        rec["_seq"] = row[0]
        return rec

    async def related(self, request_id: str) -> list[dict[str, Any]]:
        """Every other record naming ``request_id`` (feedback, approvals, ...)."""
        async with self.db.execute(
            "SELECT seq, body FROM records WHERE request_id = ? AND kind != 'exchange' ORDER BY seq", (request_id,)
        ) as cur:
            rows = await cur.fetchall()
        out = []
        for seq, body in rows:
            rec = orjson.loads(body)
            rec["_seq"] = seq
            out.append(rec)
        return out

    async def find_call(self, tool_call_id: str) -> dict[str, Any] | None:
        """The exchange whose model emitted ``tool_call_id`` (a scan; for ``show``)."""
        async with self.db.execute(
            "SELECT seq, body FROM records WHERE call_ids LIKE ? ESCAPE '\\' ORDER BY seq DESC LIMIT 1",
            (f"%,{_like(tool_call_id)},%",),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        rec: dict[str, Any] = orjson.loads(row[1])
        rec["_seq"] = row[0]
        return rec

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
        """Records matching every given filter, newest first.

        ``since``/``until`` are microseconds since the epoch (inclusive/exclusive).
        Each record carries ``_cursor``; passing the last one as ``before``
        returns the next page (keyset pagination: no OFFSET scan).  A cursor
        that is not one of ours is a ``ValueError``.
        """
        where: list[str] = []
        args: list[str | int] = []
        if before is not None:
            where.append("seq < ?")
            args.append(cursor_int(before))
        for column, value in (("request_id", request_id), ("status", status), ("tenant", tenant), ("subject", user), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if tool is not None:
            where.append("tools LIKE ? ESCAPE '\\'")
            args.append(f"%,{_like(tool)},%")
        if since is not None:
            where.append("ts_us >= ?")
            args.append(since)
        if until is not None:
            where.append("ts_us < ?")
            args.append(until)
        # The page's sequence numbers first, bodies after: a filter served by an index in another order (tenant and
        # time, a time range) then sorts integers, not every matching record's body.
        sql = "SELECT seq FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql = f"SELECT seq, body FROM records WHERE seq IN ({sql} ORDER BY seq DESC LIMIT ?) ORDER BY seq DESC"
        args.append(max(1, min(int(limit), 100_000)))
        async with self.db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        out = []
        for seq, body in rows:
            rec = orjson.loads(body)
            rec["_seq"] = seq
            rec["_cursor"] = str(seq)
            out.append(rec)
        return out

    async def chain_proof(self, seq: int, origin: str | None = None) -> ChainProof | None:
        """What shows record ``seq`` in its chain: its row, the previous record's hash, the newest checkpoint, the keys.

        ``origin`` is ignored (one chain per SQLite database); ``None`` when there is no record ``seq``.
        """
        async with self.db.execute("SELECT seq, prev_hash, hash, body FROM records WHERE seq IN (?, ?)", (seq - 1, seq)) as cur:
            rows = {int(r[0]): r for r in await cur.fetchall()}
        if seq not in rows:
            return None
        async with self.db.execute("SELECT value FROM meta WHERE key = 'origin'") as cur:
            row = await cur.fetchone()
        async with self.db.execute("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1") as cur:
            note = await cur.fetchone()
        async with self.db.execute("SELECT verifier FROM keys") as cur:
            keys = [str(k[0]) for k in await cur.fetchall()]
        _, prev_hash, h, body = rows[seq]
        before = rows.get(seq - 1)
        return ChainProof(
            origin=str(row[0]) if row else "",
            seq=seq,
            prev_hash=bytes(prev_hash),
            hash=bytes(h),
            body=bytes(body),
            previous_hash=bytes(before[2]) if before is not None else None,
            checkpoint=str(note[0]) if note else None,
            keys=keys,
        )

    async def iter_rows(self, after: int = 0, page: int = 1000) -> AsyncIterator[tuple[int, bytes, bytes, bytes]]:
        """``(seq, prev_hash, hash, body)`` in chain order, paged."""
        last = after
        while True:
            async with self.db.execute(
                "SELECT seq, prev_hash, hash, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (last, page)
            ) as cur:
                rows = await cur.fetchall()
            if not rows:
                return
            for seq, prev, h, body in rows:
                yield int(seq), bytes(prev), bytes(h), bytes(body)
                last = int(seq)

    async def iter_records(self) -> AsyncIterator[dict[str, Any]]:
        """Every record in chain order as ``{seq, prev_hash, hash, record}`` (hex hashes), for export."""
        async for seq, prev, h, body in self.iter_rows():
            yield {"seq": seq, "prev_hash": prev.hex(), "hash": h.hex(), "record": orjson.loads(body)}


@dataclass(frozen=True, slots=True)
class ChainProof:
    """The stored pieces that place one record in its hash chain (see ``proxy.audit.verify`` for the whole proof)."""

    origin: str
    seq: int
    prev_hash: bytes
    hash: bytes
    body: bytes
    previous_hash: bytes | None
    """The stored hash of record ``seq - 1`` (``None``: it is the first record, or was pruned)."""
    checkpoint: str | None
    """The newest signed checkpoint note of the chain."""
    keys: list[str]
    """The verifier keys the writers published in the database."""


class Reader(Protocol):
    """What the CLI reads through, on either backend (:class:`AuditReader`, :class:`~proxy.audit.pg_reader.PgAuditReader`)."""

    async def close(self) -> None: ...

    async def find(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None: ...

    async def related(self, request_id: str) -> list[dict[str, Any]]: ...

    async def find_call(self, tool_call_id: str) -> dict[str, Any] | None: ...

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
    ) -> list[dict[str, Any]]: ...

    def iter_records(self) -> AsyncIterator[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class PgTarget:
    """A PostgreSQL audit store to read (``[audit] backend = "postgres"``, or ``--db postgresql://...``)."""

    dsn: str

    def __str__(self) -> str:
        from llm_warden.proxy.audit.pg_verify import redact_dsn

        return redact_dsn(self.dsn)


async def open_reader(target: Path | PgTarget) -> Reader:
    """A read-only reader of either backend.

    Raises ``FileNotFoundError`` (no SQLite file), ``ConnectionError`` (the
    database cannot be reached or refuses the login) or
    :class:`~proxy.db.migrate.SchemaMismatch` (a ``ConfigError``).
    """
    if isinstance(target, Path):
        return await AuditReader.open(target)
    import asyncpg

    from llm_warden.proxy.audit.pg_reader import PgAuditReader

    try:
        return await PgAuditReader.open(target.dsn)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise ConnectionError(f"cannot open the audit database {target}: {type(e).__name__}: {e}") from None


def cursor_int(part: str) -> int:
    """One number of a page cursor: ASCII digits that fit a 64-bit column, else ``ValueError``."""
    if not (part.isascii() and part.isdigit()) or len(part) > 19 or int(part) >= 2**63:
        raise ValueError("not a cursor of this audit store")
    return int(part)


def like_pattern(s: str) -> str:
    """``s`` with LIKE's wildcards and escape character escaped (``ESCAPE '\\'``), for SQLite and PostgreSQL alike."""
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_like = like_pattern
